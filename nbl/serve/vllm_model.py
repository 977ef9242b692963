"""vLLM model classes for NBL checkpoints: the family's own vLLM model, with the replaced layers built by NBL.

``Nbl<Family>ForCausalLM`` is vLLM's ``<Family>ForCausalLM`` built while the family's ``make_layers`` hands the
replaced layers to NBL: kept layers are vLLM's own code (attention, paged KV cache, fused kernels); a layer whose
attention is replaced is an :class:`AttentionReplaced` module, which registers no attention and so gets no KV
cache; a replaced MLP swaps the kept layer's MLP for its map. Weights load through the family's own loader (the
checkpoint names match: ``attn_linear``, ``mlp.linear``).

vLLM's decoder layers pass ``(hidden_states, residual)`` with the residual stream = their sum; the modules here keep
that convention (:meth:`AttentionReplaced.forward`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm

from nbl.core.adapters import ADAPTERS
from nbl.core.checkpoint import serving_architecture
from nbl.serve.vllm_plugin import check_checkpoint

# model_type -> (vLLM module with the CausalLM class, module whose Model calls make_layers, the MLP class there,
# whether that MLP takes a bias argument)
FAMILIES: dict[str, tuple[str, str, str, bool]] = {
    "llama": ("llama", "llama", "LlamaMLP", True),
    "mistral": ("mistral", "llama", "LlamaMLP", True),  # MistralDecoderLayer builds Llama's MLP
    "qwen2": ("qwen2", "qwen2", "Qwen2MLP", False),
    "qwen3": ("qwen3", "qwen2", "Qwen2MLP", False),  # Qwen3Model is a Qwen2Model
}


def _module(name: str) -> Any:
    return importlib.import_module(f"vllm.model_executor.models.{name}")


class AddOnly(nn.Module):
    """Stands in for a post-attention norm whose MLP was replaced: the fused add of vLLM's RMSNorm, no norm."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stream = x + residual
        return stream, stream


class Map(nn.Module):
    """A replaced MLP: W h + b, or nothing (dropped)."""

    def __init__(self, d: int, linear: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d, bias=True) if linear else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h) if self.linear is not None else torch.zeros_like(h)


class AttentionReplaced(nn.Module):
    """A decoder layer whose attention sub-block became ``h + (W h + b)`` (or ``h``): no attention module, no KV
    cache. Its MLP part is the family's MLP behind an RMSNorm, a replaced MLP (:class:`Map` behind
    :class:`AddOnly`), or nothing (a replaced block)."""

    def __init__(self, d: int, attention: str, post_norm: nn.Module | None, mlp: nn.Module | None) -> None:
        super().__init__()
        self.attn_linear = nn.Linear(d, d, bias=True) if attention == "linear" else None
        if mlp is not None:
            self.post_attention_layernorm, self.mlp = post_norm, mlp
        else:
            self.mlp = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        h = hidden_states if residual is None else hidden_states + residual  # the residual stream entering
        added = self.attn_linear(h) if self.attn_linear is not None else torch.zeros_like(h)
        if self.mlp is None:  # a replaced block: the stream leaves as h + added
            return added, h
        hidden_states, residual = self.post_attention_layernorm(added, h)  # residual = h + added
        return self.mlp(hidden_states), residual


def _layer_builder(vllm_config: Any, plan: dict[str, dict[int, str]], mlp_class: type[nn.Module], mlp_bias: bool
                   ) -> Callable[[Callable[[str], nn.Module], str], nn.Module]:  # fmt: skip
    """(the family's layer factory, a layer's prefix) -> that layer, as the checkpoint's replacement says."""
    config = vllm_config.model_config.hf_config
    d = config.hidden_size

    def family_mlp(prefix: str) -> nn.Module:
        kwargs = {"bias": getattr(config, "mlp_bias", False)} if mlp_bias else {}
        return mlp_class(d, config.intermediate_size, config.hidden_act, vllm_config.quant_config,
                         prefix=f"{prefix}.mlp", **kwargs)  # fmt: skip

    def build(family_layer: Callable[[str], nn.Module], prefix: str) -> nn.Module:
        i = int(prefix.rsplit(".", 1)[-1])
        attention, mlp = plan["attention"].get(i), plan["mlp"].get(i)
        if attention is None:  # vLLM's own layer, its MLP swapped for the map if that was replaced
            layer = family_layer(prefix=prefix)
            if mlp is not None:
                layer.post_attention_layernorm, layer.mlp = AddOnly(), Map(d, mlp == "linear")
            return layer
        if mlp == "drop":  # a replaced block (or an attention map beside a dropped MLP: the same function)
            return AttentionReplaced(d, attention, None, None)
        if mlp == "linear":
            return AttentionReplaced(d, attention, AddOnly(), Map(d, True))
        return AttentionReplaced(d, attention, RMSNorm(d, eps=config.rms_norm_eps), family_mlp(prefix))

    return build


@contextmanager
def _replaced_layers(module: Any, build: Callable[[Callable[[str], nn.Module], str], nn.Module]) -> Iterator[None]:
    """While the model is built, the family's ``make_layers`` makes each layer through ``build``."""
    original = module.make_layers

    def make_layers(num_layers: int, layer_fn: Callable[[str], nn.Module], prefix: str) -> Any:
        return original(num_layers, lambda prefix: build(layer_fn, prefix), prefix)  # called as layer_fn(prefix=...)

    module.make_layers = make_layers
    try:
        yield
    finally:
        module.make_layers = original


def _nbl_class(model_type: str) -> type[nn.Module]:
    causal_module, layers_module, mlp_name, mlp_bias = FAMILIES[model_type]
    adapter = next(a for a in ADAPTERS if model_type in a.model_types)
    family = getattr(_module(causal_module), adapter.causal_lm)

    def __init__(self: nn.Module, *, vllm_config: Any, prefix: str = "") -> None:
        plan = check_checkpoint(vllm_config.model_config.hf_config, vllm_config.model_config.model)
        module = _module(layers_module)
        with _replaced_layers(module, _layer_builder(vllm_config, plan, getattr(module, mlp_name), mlp_bias)):
            family.__init__(self, vllm_config=vllm_config, prefix=prefix)

    name = serving_architecture(model_type)
    doc = f"vLLM's {adapter.causal_lm}, its replaced layers built by NBL (nbl.serve.vllm_model)."
    return type(name, (family,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


NblLlamaForCausalLM = _nbl_class("llama")
NblMistralForCausalLM = _nbl_class("mistral")
NblQwen2ForCausalLM = _nbl_class("qwen2")
NblQwen3ForCausalLM = _nbl_class("qwen3")
