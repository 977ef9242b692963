"""What a replacement saves: parameters, sparsity (the paper's definition), KV cache and a FLOP model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from nbl.core.adapters import adapter_for_config
from nbl.core.surgery import ConvShape, ReplacementMode, replaced_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Modes = Mapping[int, ReplacementMode]  # layer -> how its attention (or its MLP) was replaced
_NONE: Modes = MappingProxyType({})


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters count once


def _embedding_params(model: PreTrainedModel) -> int:
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n = embed.numel()
    if head is not None and head.weight is not embed:  # tied heads share the embedding Parameter
        n += head.weight.numel()
    return n


@dataclass(frozen=True)
class ParameterReport:
    base_params: int
    params: int
    removed: int
    non_embedding_base: int
    sparsity: float  # removed / non-embedding parameters of the base model

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parameter_report(model: PreTrainedModel) -> ParameterReport:
    """Compare ``model`` with the unmodified architecture built (weightless, on meta) from its config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model.config)
    base_params = _count(base)
    non_embedding = base_params - _embedding_params(base)
    params = _count(model)
    removed = base_params - params
    return ParameterReport(base_params, params, removed, non_embedding, removed / non_embedding)


def kv_cache_bytes_per_token(
    config: PretrainedConfig, replaced: Mapping[int, ReplacementMode] | None = None, bytes_per_value: int = 2
) -> int:
    """Bytes of K and V one token adds to the cache (all layers that keep attention) while the context fits in
    every layer's window (:func:`kv_cache_bytes`: at a longer context a sliding layer adds nothing more)."""
    adapter = adapter_for_config(config)
    n_attention = config.num_hidden_layers - len(replaced or {})
    return n_attention * 2 * adapter.num_kv_heads(config) * adapter.head_dim(config) * bytes_per_value


def kv_cache_bytes(config: PretrainedConfig, replaced: Mapping[int, ReplacementMode] | None, context: int,
                   bytes_per_value: int = 2) -> int:  # fmt: skip
    """Bytes of K and V held for one sequence of ``context`` tokens: each kept layer holds them all, a sliding one
    the last window - 1 (the next token attends to those and itself: transformers' sliding cache), so replacing a
    sliding layer saves at most its window's worth."""
    adapter = adapter_for_config(config)
    per_token = 2 * adapter.num_kv_heads(config) * adapter.head_dim(config) * bytes_per_value
    windows = [adapter.window(config, i) for i in range(config.num_hidden_layers) if i not in (replaced or {})]
    held = [context if w is None else min(context, w - 1) for w in windows]
    return sum(held) * per_token


def model_kv_bytes_per_token(model: PreTrainedModel) -> int:
    return kv_cache_bytes_per_token(model.config, replaced_layers(model), next(model.parameters()).element_size())


def conv_weights(d: int, conv: ConvShape) -> int:
    """Multiply-adds per token (= weights) of a conv map of (width T, rank r): T d^2, or r (T + 1) d."""
    width, rank = conv
    return width * d * d if rank is None else rank * (width + 1) * d


@dataclass(frozen=True)
class FlopModel:
    """Forward FLOPs (2 per multiply-add) of one token seeing ``context`` tokens, per component; ``conv``: the
    (width T, rank r) of conv maps (``replacement.mode=conv``): 2 T d^2 each, or 2 r (T + 1) d at rank r."""

    config: PretrainedConfig
    conv: ConvShape = (2, None)

    def _dims(self) -> tuple[int, int, int, int, int]:
        c = self.config
        adapter = adapter_for_config(c)
        return adapter.hidden_size(c), c.num_attention_heads, adapter.num_kv_heads(c), adapter.head_dim(c), c.vocab_size

    def layer(self, mode: ReplacementMode | None, context: float, mlp_mode: ReplacementMode | None = None,
              index: int = 0) -> float:  # fmt: skip
        """Layer ``index``; ``mode``: its attention's replacement (None: kept), ``mlp_mode``: its MLP's. A sliding
        layer attends to at most its window; a routed MLP computes its active experts."""
        d, h, kv, hd, _ = self._dims()
        adapter = adapter_for_config(self.config)
        active = adapter.mlp_params(self.config, index)[1]
        mlp = {None: 2 * active, "linear": 2 * d * d, "drop": 0}[mlp_mode]
        if mode == "drop":
            return mlp
        if mode == "linear":
            return mlp + 2 * d * d
        if mode == "conv":
            return mlp + 2 * conv_weights(d, self.conv)
        projections = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)
        seen = min(context, adapter.window(self.config, index) or context)
        scores_and_values = 2 * 2 * seen * h * hd
        return mlp + projections + scores_and_values

    def lm_head(self) -> float:
        d, *_, vocab = self._dims()
        return 2 * d * vocab

    def token(self, replaced: Modes, context: float, mlps: Modes = _NONE) -> float:
        """``replaced``: layer -> its attention's mode; ``mlps``: layer -> its MLP's mode (a block: drop there)."""
        n = self.config.num_hidden_layers
        return sum(self.layer(replaced.get(i), context, mlps.get(i), i) for i in range(n))

    def prefill(self, replaced: Modes, n: int, mlps: Modes = _NONE) -> float:
        """A causal prompt of n tokens (token t attends to t tokens: mean context (n+1)/2), logits for the last."""
        return n * self.token(replaced, (n + 1) / 2, mlps) + self.lm_head()

    def decode(self, replaced: Modes, context: int, mlps: Modes = _NONE) -> float:
        """One cached decoding step at the given context length, logits included."""
        return self.token(replaced, context, mlps) + self.lm_head()

    def prefill_speedup(self, replaced: Modes, n: int, mlps: Modes = _NONE) -> float:
        return self.prefill({}, n) / self.prefill(replaced, n, mlps)

    def decode_speedup(self, replaced: Modes, context: int, mlps: Modes = _NONE) -> float:
        return self.decode({}, context) / self.decode(replaced, context, mlps)


@dataclass(frozen=True)
class BytesModel:
    """Bytes one batch-1 decoding step reads: every weight once, plus the K and V of every cached token.

    A compiled (CUDA-graph) decode step of a 7-8B model is bound by these bytes, not by FLOPs or kernel
    launches, so its speed-up from replacing layers is about bytes_base / bytes_replaced. An eager step at
    batch 1 is bound by kernel launches instead, which replacing attention removes far more of.
    """

    config: PretrainedConfig
    bytes_per_value: int = 2
    conv: ConvShape = (2, None)  # a conv map reads its weights, its bias and its state (the last T - 1 hidden vectors)

    def layer_weights(self, mode: ReplacementMode | None, mlp_mode: ReplacementMode | None = None, index: int = 0,
                      stored: bool = False) -> int:  # fmt: skip
        """Weights of layer ``index`` a decoding step reads (a routed MLP: its router and active experts), or with
        ``stored`` all it holds."""
        c = self.config
        adapter = adapter_for_config(c)
        d, h, kv, hd = adapter.hidden_size(c), c.num_attention_heads, adapter.num_kv_heads(c), adapter.head_dim(c)
        kept_mlp = adapter.mlp_params(c, index)[0 if stored else 1]
        # the MLP and the post-attention norm; or the map that replaced them
        mlp = {None: kept_mlp + d, "linear": d * d + d, "drop": 0}[mlp_mode]
        if mode == "drop":
            return mlp
        if mode == "linear":
            return mlp + d * d + d  # W and b
        if mode == "conv":
            return mlp + conv_weights(d, self.conv) + d + (self.conv[0] - 1) * d  # W (or U, V), b and the state
        return mlp + d * h * hd + 2 * d * kv * hd + h * hd * d + d  # q, k, v, o; input norm

    def decode(self, replaced: Modes, context: int, mlps: Modes = _NONE) -> float:
        """Bytes read by one decoding step with ``context`` cached tokens (logits included)."""
        c = self.config
        weights = sum(self.layer_weights(replaced.get(i), mlps.get(i), i) for i in range(c.num_hidden_layers))
        weights += adapter_for_config(c).hidden_size(c) * (c.vocab_size + 1)  # LM head and final norm
        return weights * self.bytes_per_value + kv_cache_bytes(c, replaced, context, self.bytes_per_value)

    def decode_speedup(self, replaced: Modes, context: int, mlps: Modes = _NONE) -> float:
        return self.decode({}, context) / self.decode(replaced, context, mlps)


def mid_context(prompt_len: int, new_tokens: int) -> int:
    """The context length of the middle decoding step of a run: where predictions evaluate decode speed."""
    return prompt_len + new_tokens // 2


def predicted_speedups(config: PretrainedConfig, replaced: Modes, prompt_len: int, new_tokens: int,
                       mlps: Modes = _NONE, conv: ConvShape = (2, None)) -> dict[str, float]:  # fmt: skip
    """Speed-ups the FLOP and bytes models predict for this replacement (``replaced``: attention modes, ``mlps``:
    MLP modes, ``conv``: the (width, rank) of conv maps) for a prompt of ``prompt_len`` tokens and decoding at
    :func:`mid_context`."""
    context, flops = mid_context(prompt_len, new_tokens), FlopModel(config, conv)
    return {
        "prefill_speedup": flops.prefill_speedup(replaced, prompt_len, mlps),
        "decode_speedup": flops.decode_speedup(replaced, context, mlps),
        "decode_bytes_speedup": BytesModel(config, conv=conv).decode_speedup(replaced, context, mlps),
    }
