"""Model-family adapters: the only place that knows attribute names inside a decoder model.

Adding a family is one small subclass registered under its ``config.model_type``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class DecoderAdapter:
    """Pre-norm decoder-only models laid out as ``model.model.layers[i].{input_layernorm, self_attn, ...}``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm: ClassVar[str] = ""  # the family's CausalLM class name (transformers' and vLLM's alike)

    def backbone(self, model: PreTrainedModel) -> nn.Module:
        """The transformer without the LM head (calibration stops here)."""
        return model.model

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""
        return model.model.norm

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The MLP's output projection (a transform of the MLP's output folds into it: ReplaceMe)."""
        return self.mlp(layer).down_proj

    def set_mlp_path(self, layer: nn.Module, norm: nn.Module, mlp: nn.Module) -> None:
        """Swap the post-attention norm and the MLP (the layer computes ``h + mlp(norm(h))``)."""
        layer.post_attention_layernorm = norm
        layer.mlp = mlp

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.hidden_size

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class LlamaAdapter(DecoderAdapter):
    """Llama 2/3.x, SmolLM2, DeepSeek-R1-Distill-Llama."""

    model_types = ("llama",)
    causal_lm = "LlamaForCausalLM"


class MistralAdapter(DecoderAdapter):
    model_types = ("mistral",)
    causal_lm = "MistralForCausalLM"


class Qwen2Adapter(DecoderAdapter):
    """Qwen2 / Qwen2.5 (q/k/v projections carry biases; removed with the attention)."""

    model_types = ("qwen2",)
    causal_lm = "Qwen2ForCausalLM"


class Qwen3Adapter(DecoderAdapter):
    """Qwen3 (per-head q/k RMSNorm inside the attention; removed with it)."""

    model_types = ("qwen3",)
    causal_lm = "Qwen3ForCausalLM"


ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


class UnsupportedModelError(ValueError):
    pass


def adapter_for_config(config: PretrainedConfig) -> DecoderAdapter:
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r} ({getattr(config, 'architectures', None)}); "
        f"NBL supports model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def get_adapter(model: PreTrainedModel) -> DecoderAdapter:
    return adapter_for_config(model.config)
