"""vLLM model classes for NBL checkpoints: the family's own vLLM model, with the replaced layers built by NBL.

``Nbl<Family>ForCausalLM`` is vLLM's ``<Family>ForCausalLM`` built while the family's ``make_layers`` hands the
replaced layers to NBL: kept layers are vLLM's own code (attention, paged KV cache, fused kernels); a layer whose
attention is replaced is an :class:`AttentionReplaced` module, which registers no attention and so gets no KV
cache; a replaced MLP swaps the kept layer's MLP for its map. Weights load through the family's own loader.

Every map is a vLLM parallel linear, so under tensor parallelism each rank stores and computes 1 / TP of it, as of
the attention it replaced: a d x d map is row-parallel (each rank multiplies its slice of the replicated input and
the partial sums are all-reduced); a reduced-rank map is its two factors, the first column-parallel and the
second row-parallel (one all-reduce, 1 / TP of both).

A checkpoint with convolution maps declares ``NblConv<Family>ForCausalLM``, the same model declared hybrid: each
:class:`ConvMap` is a state layer of vLLM's hybrid-model machinery (``MambaBase``, the state layout of vLLM's
``ShortConv``), so its T - 1 hidden vectors per sequence are allocated, freed, preempted and prefix-cached by
vLLM's cache manager, and it gets no KV cache.

vLLM's decoder layers pass ``(hidden_states, residual)`` with the residual stream = their sum; the modules here keep
that convention (:meth:`AttentionReplaced.forward`).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba import short_conv  # noqa: F401  (registers the op vllm::short_conv)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from nbl.core.adapters import ADAPTERS
from nbl.core.checkpoint import serving_architecture
from nbl.serve.partition import ENV, balanced_partition
from nbl.serve.vllm_plugin import SERVED_FAMILIES, ServedPlan, check_checkpoint

logger = init_logger(__name__)

class ServedFamily(NamedTuple):
    """Where vLLM keeps a family's model and how its layers build an MLP and a norm."""

    causal_module: str  # the vLLM module with the CausalLM class (a dotted path: NBL's own, OLMo 2)
    layers_module: str  # the module whose Model calls make_layers
    mlp: str  # the MLP class there
    mlp_bias: bool  # whether that MLP takes a bias argument
    activation: str = "hidden_act"  # the config field its activation comes from
    norm: type[nn.Module] = RMSNorm  # the family's norm (Gemma's scales by 1 + w)
    fused_add: bool = True  # its layers pass (hidden_states, residual); False: one tensor (Granite, OLMo 2)
    mlp_name: str = "mlp"  # the MLP's name in vLLM's layer (Mixtral's routed block: block_sparse_moe)
    routed: bool = False  # MoE: a replaced layer is the family's own, its attention taken out (see _without_attention)


FAMILIES: dict[str, ServedFamily] = {
    "llama": ServedFamily("llama", "llama", "LlamaMLP", True),
    "mistral": ServedFamily("mistral", "llama", "LlamaMLP", True),  # MistralDecoderLayer builds Llama's MLP
    "qwen2": ServedFamily("qwen2", "qwen2", "Qwen2MLP", False),
    "qwen3": ServedFamily("qwen3", "qwen2", "Qwen2MLP", False),  # Qwen3Model is a Qwen2Model
    "phi3": ServedFamily("phi3", "llama", "LlamaMLP", True),  # vLLM's Phi3ForCausalLM is its Llama, fused names
    "granite": ServedFamily("granite", "granite", "GraniteMLP", True, fused_add=False),
    "olmo2": ServedFamily("nbl.serve.vllm_olmo2", "nbl.serve.vllm_olmo2", "LlamaMLP", True, fused_add=False),
    "mixtral": ServedFamily("mixtral", "mixtral", "MixtralMoE", False, mlp_name="block_sparse_moe", routed=True),
    "qwen3_moe": ServedFamily("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", False, routed=True),
    "olmoe": ServedFamily("olmoe", "olmoe", "OlmoeMoE", False, routed=True),
    "gemma2": ServedFamily("gemma2", "gemma2", "Gemma2MLP", False, "hidden_activation", GemmaRMSNorm),
    "gemma3_text": ServedFamily("gemma3", "gemma3", "Gemma3MLP", False, "hidden_activation", GemmaRMSNorm),
}
if set(FAMILIES) != set(SERVED_FAMILIES):
    raise ImportError(f"nbl.serve.vllm_model builds {sorted(FAMILIES)}, the plugin registers {sorted(SERVED_FAMILIES)}")


def _module(name: str) -> Any:
    return importlib.import_module(name if "." in name else f"vllm.model_executor.models.{name}")


def row_map(d_in: int, d_out: int, prefix: str, bias: bool = True, input_is_parallel: bool = False) -> nn.Module:
    """A map's (last) factor as a row-parallel linear, in the model's dtype (``quant_config`` None: maps stay
    unquantized beside quantized kept layers)."""
    return RowParallelLinear(d_in, d_out, bias=bias, input_is_parallel=input_is_parallel, return_bias=False,
                             prefix=prefix)  # fmt: skip


class AddOnly(nn.Module):
    """Stands in for a post-attention norm whose MLP was replaced: the fused add of vLLM's RMSNorm, no norm."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stream = x + residual
        return stream, stream


class Map(nn.Module):
    """A replaced MLP: W h + b, or nothing (dropped)."""

    def __init__(self, d: int, linear: bool, prefix: str) -> None:
        super().__init__()
        self.linear = row_map(d, d, f"{prefix}.linear") if linear else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h) if self.linear is not None else torch.zeros_like(h)


class ConvMap(MambaBase, nn.Module):
    """``a_t = W [h_t, h_(t-1), ..., h_(t-T+1)] + b`` with its state, the last T - 1 inputs of each sequence, held
    by vLLM as a hybrid model's short-convolution state (one page per sequence, ``(T - 1) x d`` values).

    The state shape and copy rule are vLLM's ``ShortConv``'s, so prefix caching and preemption treat it alike; the
    forward runs through vLLM's ``short_conv`` op (a graph split point that calls :meth:`forward_native` on the CPU,
    :meth:`forward_cuda` elsewhere), so compiled and captured models run it eagerly with the batch's metadata.
    The state is replicated across tensor-parallel ranks (T - 1 vectors of d: small); the projection is split.
    """

    def __init__(self, d: int, width: int, rank: int | None, prefix: str) -> None:
        super().__init__()
        self.d, self.width, self.prefix = d, width, prefix
        if rank is None:
            self.proj = row_map(width * d, d, f"{prefix}.proj")
        else:  # U V: V column-parallel (each rank r / TP rows), U row-parallel over those rows
            self.down = ColumnParallelLinear(width * d, rank, bias=False, return_bias=False, prefix=f"{prefix}.down")
            self.up = row_map(rank, d, f"{prefix}.up", input_is_parallel=True)
        vllm_config = get_current_vllm_config()
        self.model_config, self.cache_config = vllm_config.model_config, vllm_config.cache_config
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self  # where vLLM binds the state pages and the op finds the layer
        self.kv_cache = (torch.tensor([]),)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV  # its metadata: state slots, prefill starts, initial states

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        return True

    def get_state_shape(self) -> tuple[tuple[int, int]]:
        return MambaStateShapeCalculator.short_conv_state_shape(1, self.d, self.width)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(self.model_config.dtype,
                                                                 self.cache_config.mamba_cache_dtype)  # fmt: skip

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features) if hasattr(self, "proj") else self.up(self.down(features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(h)
        torch.ops.vllm.short_conv(h, output, self.prefix)
        return output

    def forward_native(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # vLLM's profile run: only the shapes and the work matter
            n = hidden_states.shape[0]
            output[:n] = self.project(hidden_states.repeat(1, self.width))
            return
        state = self.kv_cache[0] if not is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
        slots, starts, lengths, has_state = _requests(metadata, hidden_states.device)
        output[:tokens] = self.project(conv_step(hidden_states[:tokens], state, slots, starts, lengths, has_state))

    forward_cuda = forward_native  # plain torch: the same code on every device


def _requests(metadata: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The batch's requests, decodes (one token each) first as vLLM orders them: each one's state slot, first
    token, token count and whether it continues from a stored state (a decode always does; a prefill when part of
    its prompt was computed before: chunked prefill, a prefix-cache hit)."""
    decodes, prefills = metadata.num_decode_tokens, metadata.num_prefills
    if metadata.num_decodes != decodes:
        raise RuntimeError("speculative decoding is not supported with NBL convolution maps")
    slots, starts, lengths, has_state = [], [], [], []
    if decodes:
        slots.append(metadata.state_indices_tensor_d[:, 0])
        starts.append(torch.arange(decodes, device=device))
        lengths.append(torch.ones(decodes, dtype=torch.long, device=device))
        has_state.append(torch.ones(decodes, dtype=torch.bool, device=device))
    if prefills:
        loc = metadata.query_start_loc_p.to(torch.long)
        slots.append(metadata.state_indices_tensor_p)
        starts.append(decodes + loc[:-1])
        lengths.append(loc[1:] - loc[:-1])
        has_state.append(metadata.has_initial_states_p)
    return tuple(torch.cat(parts) for parts in (slots, starts, lengths, has_state))


def conv_step(h: torch.Tensor, state: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
              has_state: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The features ``[h_t, h_(t-1), ..., h_(t-T+1)]`` of every token of a batch of requests whose tokens lie one
    after another in ``h`` (tokens, d), each request's T - 1 earlier inputs read from ``state[slot]`` ((T - 1) x d,
    oldest first; zeros where it starts a sequence); ``state[slot]`` then holds each request's last T - 1 inputs.

    Each request's tokens are laid out after its T - 1 earlier inputs in one buffer, so the j-th shift of every
    token is one gather, whatever the request lengths (a request shorter than T - 1 reaches into its stored state).
    """
    t = state.shape[1]
    n, requests = h.shape[0], torch.arange(len(slots), device=h.device)
    rows = torch.arange(n, device=h.device) + t * (torch.repeat_interleave(requests, lengths, output_size=n) + 1)
    earlier = (starts + t * requests)[:, None] + torch.arange(t, device=h.device)  # (requests, T - 1) rows
    buffer = h.new_empty(n + t * len(slots), h.shape[1])
    buffer[rows] = h
    buffer[earlier.flatten()] = (state[slots] * has_state[:, None, None].to(h.dtype)).to(h.dtype).flatten(0, 1)
    last = starts + lengths - 1 + t * (requests + 1)
    state[slots] = buffer[last[:, None] - t + 1 + torch.arange(t, device=h.device)].to(state.dtype)
    return torch.cat([buffer[rows - j] for j in range(t + 1)], dim=-1)


class AttentionReplaced(nn.Module):
    """A decoder layer whose attention sub-block became ``h + (W h + b)``, ``h + conv(h)`` or ``h``: no attention
    module, no KV cache. Its MLP part is the family's MLP path under the family's names (the first module the norm
    that takes the fused add, as vLLM's layers call it; Gemma's a norm after the MLP too), a replaced MLP
    (:class:`Map` behind :class:`AddOnly`), or nothing (a replaced block)."""

    def __init__(self, attention_map: nn.Module | None, mlp_path: dict[str, nn.Module] | None) -> None:
        nn.Module.__init__(self)  # not super(): a family's decoder-layer class may follow in the MRO
        self.attn_linear = attention_map
        self.mlp_path = tuple(mlp_path or ())
        for name, module in (mlp_path or {}).items():
            setattr(self, name, module)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        h = hidden_states if residual is None else hidden_states + residual  # the residual stream entering
        added = self.attn_linear(h) if self.attn_linear is not None else torch.zeros_like(h)
        if not self.mlp_path:  # a replaced block: the stream leaves as h + added
            return added, h
        first, *rest = self.mlp_path
        hidden_states, residual = getattr(self, first)(added, h)  # residual = h + added
        for name in rest:
            hidden_states = getattr(self, name)(hidden_states)
        return hidden_states, residual


class ScaledAttentionReplaced(AttentionReplaced):
    """:class:`AttentionReplaced` for families whose layers pass one tensor (Granite, OLMo 2) and may scale each
    sub-block's output by a residual multiplier ``s`` before adding it (Granite; 1 elsewhere): ``h + s * map(h)``,
    then ``+ s * mlp_path(.)``. The maps were fitted on what the paths compute before ``s`` (as
    :class:`nbl.core.surgery.LinearizedDecoderLayer`)."""

    def __init__(self, attention_map: nn.Module | None, mlp_path: dict[str, nn.Module] | None, scale: float) -> None:
        super().__init__(attention_map, mlp_path)
        self.scale = scale

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,  # type: ignore[override]
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        h = hidden_states
        if self.attn_linear is not None:
            h = h + self.scale * self.attn_linear(h)
        if not self.mlp_path:
            return h
        added = h
        for name in self.mlp_path:
            added = getattr(self, name)(added)
        return h + self.scale * added


def _without_attention(layer: nn.Module, prefix: str, attention_map: nn.Module | None,
                       mlp_path: dict[str, nn.Module] | None, mlp_name: str) -> nn.Module:  # fmt: skip
    """The family's own decoder layer (MoE families: their model classes check every layer's class and collect its
    routed block) turned into :class:`AttentionReplaced` with ``mlp_path`` (its own modules, a map, or None: a
    replaced block): every module it had deleted, its attention's registration for a KV cache withdrawn."""
    context = get_current_vllm_config().compilation_config.static_forward_context
    for name in [n for n in context if n.startswith(f"{prefix}.self_attn.")]:
        del context[name]  # no attention registered: no KV cache for this layer
    for name, _ in list(layer.named_children()):
        delattr(layer, name)
    layer.__class__ = _replaced_class(type(layer))
    AttentionReplaced.__init__(layer, attention_map, mlp_path)
    if mlp_path is None:  # a replaced block: the model class still reads the layer's MLP (a placeholder, unused)
        setattr(layer, mlp_name, nn.Identity())
    return layer


_REPLACED_CLASSES: dict[type, type] = {}


def _replaced_class(family_layer: type) -> type:
    """:class:`AttentionReplaced` that is also an instance of the family's decoder-layer class (its forward first)."""
    if family_layer not in _REPLACED_CLASSES:
        name = f"Replaced{family_layer.__name__}"
        _REPLACED_CLASSES[family_layer] = type(name, (AttentionReplaced, family_layer), {"__module__": __name__})
    return _REPLACED_CLASSES[family_layer]


def _attention_map(plan: ServedPlan, i: int, d: int, prefix: str) -> nn.Module | None:
    mode = plan["attention"][i]
    if mode == "conv":
        width, rank = plan["conv"][i]
        return ConvMap(d, width, rank, f"{prefix}.attn_linear")
    return row_map(d, d, f"{prefix}.attn_linear") if mode == "linear" else None


def _replaced_mlp_path(names: tuple[str, ...], mlp_name: str, d: int, linear: bool, prefix: str, fused_add: bool
                       ) -> dict[str, nn.Module]:  # fmt: skip
    """A replaced MLP path under the served layer's names: the map where the MLP (``mlp_name``) was, nothing else
    (a norm before it the fused add alone, where the family's layers fuse the add into that norm)."""
    first = AddOnly() if fused_add else nn.Identity()
    return {name: Map(d, linear, f"{prefix}.{mlp_name}") if name == mlp_name else first if k == 0 else nn.Identity()
            for k, name in enumerate(names)}  # fmt: skip


def _layer_builder(vllm_config: Any, plan: ServedPlan, model_type: str
                   ) -> Callable[[Callable[[str], nn.Module], str], nn.Module]:  # fmt: skip
    """(the family's layer factory, a layer's prefix) -> that layer, as the checkpoint's replacement says."""
    config = vllm_config.model_config.hf_config
    served = FAMILIES[model_type]
    # the MLP path's modules as vLLM's layer names them (Mixtral's routed block: block_sparse_moe, not mlp)
    names = tuple(served.mlp_name if n == "mlp" else n for n in _adapter(model_type).mlp_path)
    mlp_class = getattr(_module(served.layers_module), served.mlp)
    d = config.hidden_size

    def family_path(prefix: str) -> dict[str, nn.Module]:
        kwargs = {"bias": getattr(config, "mlp_bias", False)} if served.mlp_bias else {}
        mlp = mlp_class(d, config.intermediate_size, getattr(config, served.activation), vllm_config.quant_config,
                        prefix=f"{prefix}.mlp", **kwargs)  # fmt: skip
        return {name: mlp if name == served.mlp_name else served.norm(d, eps=config.rms_norm_eps) for name in names}

    def replaced_path(linear: bool, prefix: str) -> dict[str, nn.Module]:
        return _replaced_mlp_path(names, served.mlp_name, d, linear, prefix, served.fused_add)

    def build(family_layer: Callable[[str], nn.Module], prefix: str) -> nn.Module:
        i = int(prefix.rsplit(".", 1)[-1])
        mlp = plan["mlp"].get(i)
        if i not in plan["attention"]:  # vLLM's own layer, its MLP path swapped for the map if that was replaced
            layer = family_layer(prefix=prefix)
            for name, module in (replaced_path(mlp == "linear", prefix) if mlp else {}).items():
                setattr(layer, name, module)
            return layer
        attention_map = _attention_map(plan, i, d, prefix)
        layer = family_layer(prefix=prefix) if served.routed else None  # MoE: its own layer, attention taken out
        if mlp == "drop":  # a replaced block (or an attention map beside a dropped MLP: the same function)
            path = None
        elif mlp:
            path = replaced_path(True, prefix)
        else:  # the family's MLP path: the routed layer's own modules, or built
            path = {n: getattr(layer, n) for n in names} if layer is not None else family_path(prefix)
        if layer is not None:
            return _without_attention(layer, prefix, attention_map, path, served.mlp_name)
        if not served.fused_add:
            return ScaledAttentionReplaced(attention_map, path, _adapter(model_type)().residual_scale(config))
        return AttentionReplaced(attention_map, path)

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


_CONV_WEIGHT = re.compile(r"(.*layers\.(\d+)\.attn_linear)\.(weight|bias|down|up)$")


def conv_weight_names(plan: ServedPlan) -> Callable[[str], str]:
    """A checkpoint's weight name -> the served module's: a conv map's ``W`` / ``b`` (``attn_linear.weight``,
    ``.bias``) or factors (``.down``, ``.up``, ``.bias``) are the parameters of its parallel linears."""

    def rename(name: str) -> str:
        match = _CONV_WEIGHT.match(name)
        if match is None or plan["attention"].get(int(match[2])) != "conv":
            return name
        base, layer, field = match.groups()
        factors = plan["conv"][int(layer)][1] is not None
        target = {"weight": "proj.weight", "down": "down.weight", "up": "up.weight",
                  "bias": "up.bias" if factors else "proj.bias"}[field]  # fmt: skip
        return f"{base}.{target}"

    return rename


def _hybrid_methods() -> dict[str, Any]:
    """What makes the family's class a hybrid model for vLLM: the convolution state's shape, dtype and copy rule,
    read from the checkpoint's declared maps (one width for all: vLLM sizes one state page for every state layer)."""

    def width(vllm_config: Any) -> int:
        return check_checkpoint(vllm_config.model_config.hf_config)["conv_width"]

    def get_mamba_state_shape_from_config(cls: type, vllm_config: Any) -> tuple[tuple[int, int]]:
        return MambaStateShapeCalculator.short_conv_state_shape(1, vllm_config.model_config.hf_config.hidden_size,
                                                                width(vllm_config))  # fmt: skip

    def get_mamba_state_dtype_from_config(cls: type, vllm_config: Any) -> tuple[torch.dtype, ...]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(vllm_config.model_config.dtype,
                                                                vllm_config.cache_config.mamba_cache_dtype)  # fmt: skip

    def get_mamba_state_copy_func(cls: type) -> tuple[Any, ...]:
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()

    return {
        "get_mamba_state_shape_from_config": classmethod(get_mamba_state_shape_from_config),
        "get_mamba_state_dtype_from_config": classmethod(get_mamba_state_dtype_from_config),
        "get_mamba_state_copy_func": classmethod(get_mamba_state_copy_func),
    }


def _load_weights(family: type[nn.Module], mlp_name: str) -> Callable[..., set[str]]:
    """The family's weight loader, the checkpoint's names renamed to the served modules' (conv maps' parameters,
    the MLP under vLLM's name for it where transformers' differs: Mixtral's ``mlp`` is vLLM's ``block_sparse_moe``)."""
    mlp = re.compile(r"(layers\.\d+)\.mlp\.")

    def load_weights(self: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        conv = conv_weight_names(check_checkpoint(self.config))

        def rename(name: str) -> str:
            name = conv(name)
            return mlp.sub(rf"\1.{mlp_name}.", name) if mlp_name != "mlp" else name

        return family.load_weights(self, ((rename(name), w) for name, w in _per_expert(weights)))

    return load_weights


def _per_expert(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5's fused expert tensors (``experts.gate_up_proj``: experts x 2I x d, gate rows first;
    ``experts.down_proj``: experts x d x I), as an NBL checkpoint stores them, split into the per-expert weights
    vLLM's MoE loaders read (``experts.<e>.gate_proj.weight``, ...; Mixtral's maps them to w1 / w3 / w2). Other
    weights pass unchanged."""
    for name, w in weights:
        base, _, field = name.rpartition(".experts.")
        if field == "gate_up_proj" and w.dim() == 3:
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in w):
                yield f"{base}.experts.{e}.gate_proj.weight", gate
                yield f"{base}.experts.{e}.up_proj.weight", up
        elif field == "down_proj" and w.dim() == 3:
            for e, down in enumerate(w):
                yield f"{base}.experts.{e}.down_proj.weight", down
        else:
            yield name, w


def _check_partition(plan: ServedPlan, layers: int, stages: int) -> None:
    """Under pipeline parallelism, say when vLLM's cut loses the KV saving (:mod:`nbl.serve.partition`)."""
    kept = [i not in plan["attention"] for i in range(layers)]
    balanced = ",".join(map(str, balanced_partition(kept, stages)))
    if os.environ.get(ENV) != balanced:
        logger.warning("NBL: %s=%s puts the same number of kept attention layers on every stage (each stage gets "
                       "the KV blocks of the fullest one); the current cut is %s", ENV, balanced,
                       os.environ.get(ENV, "vLLM's even cut"))  # fmt: skip


def _adapter(model_type: str) -> type:
    return next(a for a in ADAPTERS if model_type in a.model_types)


def _nbl_class(model_type: str, conv: bool) -> type[nn.Module]:
    adapter = _adapter(model_type)
    family = getattr(_module(FAMILIES[model_type].causal_module), adapter.causal_lm)

    def __init__(self: nn.Module, *, vllm_config: Any, prefix: str = "") -> None:
        plan = check_checkpoint(vllm_config.model_config.hf_config, vllm_config.model_config.model)
        if plan["conv"] and vllm_config.speculative_config is not None:
            raise ValueError("NBL convolution maps do not support speculative decoding: serve without it")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            _check_partition(plan, vllm_config.model_config.hf_config.num_hidden_layers,
                             vllm_config.parallel_config.pipeline_parallel_size)  # fmt: skip
        with _replaced_layers(_module(FAMILIES[model_type].layers_module), _layer_builder(vllm_config, plan, model_type)):
            family.__init__(self, vllm_config=vllm_config, prefix=prefix)

    name = serving_architecture(model_type, conv=conv)
    doc = f"vLLM's {adapter.causal_lm}, its replaced layers built by NBL (nbl.serve.vllm_model)."
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                 "load_weights": _load_weights(family, FAMILIES[model_type].mlp_name)}  # fmt: skip
    bases: tuple[type, ...] = (family, IsHybrid, HasInnerState) if conv else (family,)
    return type(name, bases, {**namespace, **(_hybrid_methods() if conv else {})})


NblLlamaForCausalLM = _nbl_class("llama", conv=False)
NblMistralForCausalLM = _nbl_class("mistral", conv=False)
NblQwen2ForCausalLM = _nbl_class("qwen2", conv=False)
NblQwen3ForCausalLM = _nbl_class("qwen3", conv=False)
NblPhi3ForCausalLM = _nbl_class("phi3", conv=False)
NblGraniteForCausalLM = _nbl_class("granite", conv=False)
NblOlmo2ForCausalLM = _nbl_class("olmo2", conv=False)
NblMixtralForCausalLM = _nbl_class("mixtral", conv=False)
NblQwen3MoeForCausalLM = _nbl_class("qwen3_moe", conv=False)
NblOlmoeForCausalLM = _nbl_class("olmoe", conv=False)
NblGemma2ForCausalLM = _nbl_class("gemma2", conv=False)
NblGemma3ForCausalLM = _nbl_class("gemma3_text", conv=False)
NblConvLlamaForCausalLM = _nbl_class("llama", conv=True)
NblConvMistralForCausalLM = _nbl_class("mistral", conv=True)
NblConvQwen2ForCausalLM = _nbl_class("qwen2", conv=True)
NblConvQwen3ForCausalLM = _nbl_class("qwen3", conv=True)
NblConvPhi3ForCausalLM = _nbl_class("phi3", conv=True)
NblConvGraniteForCausalLM = _nbl_class("granite", conv=True)
NblConvOlmo2ForCausalLM = _nbl_class("olmo2", conv=True)
NblConvMixtralForCausalLM = _nbl_class("mixtral", conv=True)
NblConvQwen3MoeForCausalLM = _nbl_class("qwen3_moe", conv=True)
NblConvOlmoeForCausalLM = _nbl_class("olmoe", conv=True)
NblConvGemma2ForCausalLM = _nbl_class("gemma2", conv=True)
NblConvGemma3ForCausalLM = _nbl_class("gemma3_text", conv=True)
