"""Model-family adapters: the only place that knows attribute names inside a decoder model.

Adding a family is one small subclass registered under its ``config.model_type``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class DecoderAdapter:
    """Decoder-only models laid out as ``model.model.layers[i]``, each layer adding two sub-blocks to the stream:
    ``h + s * path(h)`` for the attention path, then for the MLP path, where a path is the layer's modules named in
    ``attention_path`` / ``mlp_path``, applied in that order, and ``s`` the family's residual scale (1 but Granite).

    A map that replaces a sub-block stands in for its whole path (norms on either side included) and is fitted on
    what the path computes before ``s``; the layer still multiplies by ``s`` (:func:`residual_scale`).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm: ClassVar[str] = ""  # the family's CausalLM class name (transformers' and vLLM's alike)
    attention_path: ClassVar[tuple[str, ...]] = ("input_layernorm", "self_attn")
    mlp_path: ClassVar[tuple[str, ...]] = ("post_attention_layernorm", "mlp")
    # what a replaced MLP's output may be transformed by and folded into (ReplaceMe); None: the path ends in a norm
    # or in routed experts, where no transform folds
    mlp_fold: ClassVar[str | None] = "down_proj"

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

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def path(self, layer: nn.Module, part: str) -> dict[str, nn.Module]:
        """The modules of a layer's ``attention`` or ``mlp`` path by name, in the order they apply."""
        names = self.attention_path if part == "attention" else self.mlp_path
        return {name: getattr(layer, name) for name in names}

    def set_mlp_path(self, layer: nn.Module, modules: dict[str, nn.Module]) -> None:
        """Swap the MLP path's modules (the layer then computes ``h + s * path(h)`` with these)."""
        for name, module in modules.items():
            setattr(layer, name, module)

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The MLP's output projection (a transform of the MLP's output folds into it: ReplaceMe)."""
        if self.mlp_fold is None:
            raise UnsupportedModelError(
                f"{type(self).__name__.removesuffix('Adapter')}: the MLP sub-block ends in a norm or in routed "
                "experts, so no transform of its output folds into one projection (ReplaceMe cannot run here)"
            )
        return getattr(self.mlp(layer), self.mlp_fold)

    def residual_scale(self, config: PretrainedConfig) -> float:
        """``s``: what the layer multiplies each sub-block's path output by before adding it to the stream."""
        return 1.0

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.hidden_size

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def window(self, config: PretrainedConfig, layer: int) -> int | None:
        """The attention window of ``layer`` (its KV cache holds at most that many tokens), or None: full."""
        types = getattr(config, "layer_types", None)
        if types is not None:
            return config.sliding_window if types[layer] == "sliding_attention" else None
        if getattr(config, "use_sliding_window", True) is False:  # Qwen2 / Qwen3 keep a sliding_window they ignore
            return None
        return getattr(config, "sliding_window", None)

    def mlp_params(self, config: PretrainedConfig, layer: int) -> tuple[int, int]:
        """(stored, read per token) weights of the MLP of ``layer``: a gated MLP reads all of them; a routed expert
        block its router and the experts a token is sent to."""
        n = 3 * self.hidden_size(config) * config.intermediate_size
        return n, n


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


class Phi3Adapter(DecoderAdapter):
    """Phi-3 / Phi-4: fused ``qkv_proj`` and ``gate_up_proj`` (the MLP granularity replaces the fused MLP whole);
    the residual dropouts are the identity in evaluation."""

    model_types = ("phi3",)
    causal_lm = "Phi3ForCausalLM"


class GraniteAdapter(DecoderAdapter):
    """Granite 3.x: both sub-blocks scaled by ``residual_multiplier`` before the residual add (the embedding and
    attention multipliers act outside the replaced paths, or inside the attention that goes)."""

    model_types = ("granite",)
    causal_lm = "GraniteForCausalLM"

    def residual_scale(self, config: PretrainedConfig) -> float:
        return float(config.residual_multiplier)


class Olmo2Adapter(DecoderAdapter):
    """OLMo 2: no norm before the attention or the MLP, one after each (``h + norm(attn(h))``)."""

    model_types = ("olmo2",)
    causal_lm = "Olmo2ForCausalLM"
    attention_path = ("self_attn", "post_attention_layernorm")
    mlp_path = ("mlp", "post_feedforward_layernorm")
    mlp_fold = None


class Gemma2Adapter(DecoderAdapter):
    """Gemma 2: norms on both sides of the attention and of the MLP (``h + post_norm(attn(input_norm(h)))``);
    sliding and global layers alternate (``config.layer_types``); the embedding scale and the logit soft-capping act
    outside the replaced paths."""

    model_types = ("gemma2",)
    causal_lm = "Gemma2ForCausalLM"
    attention_path = ("input_layernorm", "self_attn", "post_attention_layernorm")
    mlp_path = ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")
    mlp_fold = None


class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3 text models (five sliding layers to one global; q / k norms inside the attention)."""

    model_types = ("gemma3_text",)
    causal_lm = "Gemma3ForCausalLM"


class MoeAdapter(DecoderAdapter):
    """Routed expert MLPs (``mlp`` a sparse MoE block): the attention's replacement is the dense families'; the MLP
    granularity replaces the whole routed block (router, experts, shared expert) by one map of the stream."""

    mlp_fold = None
    experts_field: ClassVar[str] = "num_experts"
    expert_size_field: ClassVar[str] = "intermediate_size"

    def routed(self, config: PretrainedConfig, layer: int) -> bool:
        return True

    def mlp_params(self, config: PretrainedConfig, layer: int) -> tuple[int, int]:
        if not self.routed(config, layer):
            return super().mlp_params(config, layer)
        d, experts = self.hidden_size(config), getattr(config, self.experts_field)
        expert = 3 * d * getattr(config, self.expert_size_field)
        router = d * experts
        return router + experts * expert, router + config.num_experts_per_tok * expert


class MixtralAdapter(MoeAdapter):
    model_types = ("mixtral",)
    causal_lm = "MixtralForCausalLM"
    experts_field = "num_local_experts"


class Qwen3MoeAdapter(MoeAdapter):
    """Qwen3-MoE (dense MLPs in ``mlp_only_layers`` and off the ``decoder_sparse_step``)."""

    model_types = ("qwen3_moe",)
    causal_lm = "Qwen3MoeForCausalLM"
    expert_size_field = "moe_intermediate_size"

    def routed(self, config: PretrainedConfig, layer: int) -> bool:
        sparse = config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0
        return layer not in config.mlp_only_layers and sparse


class OlmoeAdapter(MoeAdapter):
    model_types = ("olmoe",)
    causal_lm = "OlmoeForCausalLM"


ADAPTERS: tuple[type[DecoderAdapter], ...] = (
    LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Phi3Adapter, GraniteAdapter, Olmo2Adapter,
    Gemma2Adapter, Gemma3Adapter, MixtralAdapter, Qwen3MoeAdapter, OlmoeAdapter,
)  # fmt: skip
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
