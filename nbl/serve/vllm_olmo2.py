"""OLMo 2 as a vLLM model, for NBL checkpoints. vLLM 0.32 has no OLMo 2 model of its own (its registry sends
``Olmo2ForCausalLM`` to the generic Transformers backend, whose layers NBL cannot replace), so this module builds
one from vLLM's layers, with the family's own layout (transformers' ``modeling_olmo2``):

    h = h + post_attention_layernorm(self_attn(h));  h = h + post_feedforward_layernorm(mlp(h))

no norm before either sub-block, and q / k RMS norms over the whole query and key projections (not per head).
Under tensor parallelism each rank holds a slice of those projections, so :class:`ProjectionNorm` all-reduces the
sum of squares (one number per token), not the projections themselves.

Layers are made through this module's ``make_layers``, so :mod:`nbl.serve.vllm_model` replaces them as it does
every family's; the MLP is vLLM's ``LlamaMLP`` (OLMo 2's is Llama's gated SiLU MLP without biases). (No
``from __future__ import annotations`` here: vLLM's ``support_torch_compile`` reads ``forward``'s annotations as
types.)
"""

from collections.abc import Iterable
from itertools import islice
from typing import Any, ClassVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors


class ProjectionNorm(nn.Module):
    """RMS norm over a whole projection (``size`` values per token) of which this rank holds ``size / TP`` (or, for
    keys with fewer heads than ranks, one head that ``replicas`` ranks hold alike): the sum of squares is
    all-reduced, each slice counted once, and the rank's slice of the weight is loaded."""

    def __init__(self, size: int, local: int, shard: int, replicas: int, eps: float) -> None:
        super().__init__()
        self.size, self.local, self.shard, self.replicas, self.eps = size, local, shard, replicas, eps
        self.weight = nn.Parameter(torch.ones(local))
        self.weight.weight_loader = self.load_slice  # type: ignore[attr-defined]

    def load_slice(self, param: nn.Parameter, full: torch.Tensor) -> None:
        param.data.copy_(full.narrow(0, self.shard * self.local, self.local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(-1, keepdim=True)
        if get_tensor_model_parallel_world_size() > 1:
            squares = tensor_model_parallel_all_reduce(squares) / self.replicas
        return (self.weight.float() * x.float() * torch.rsqrt(squares / self.size + self.eps)).to(x.dtype)


class Olmo2Attention(nn.Module):
    """OLMo 2's attention: q / k normed over their whole projections, then rotary embeddings, then attention."""

    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
            raise ValueError(f"OLMo 2 with {heads} heads and {kv_heads} KV heads cannot be split over {tp} ranks")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        local_kv_heads = max(1, kv_heads // tp)
        self.q_size, self.kv_size = heads // tp * self.head_dim, local_kv_heads * self.head_dim
        replicas = max(1, tp // kv_heads)  # ranks that hold the same KV head (vLLM's QKVParallelLinear)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")  # fmt: skip
        self.q_norm = ProjectionNorm(heads * self.head_dim, self.q_size, rank, 1, config.rms_norm_eps)
        self.k_norm = ProjectionNorm(kv_heads * self.head_dim, self.kv_size, rank // replicas, replicas,
                                     config.rms_norm_eps)  # fmt: skip
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters)  # fmt: skip
        self.attn = Attention(heads // tp, self.head_dim, self.head_dim**-0.5, num_kv_heads=local_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")  # fmt: skip
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")  # fmt: skip

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class Olmo2DecoderLayer(nn.Module):
    """``h + post_attention_layernorm(self_attn(h))``, then ``+ post_feedforward_layernorm(mlp(.))``: one tensor in
    and out (no fused residual add: the norms act on the sub-blocks' outputs, not on the stream)."""

    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn = Olmo2Attention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(d, config.intermediate_size, config.hidden_act, quant_config, prefix=f"{prefix}.mlp")
        self.post_feedforward_layernorm = RMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states + self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        return h + self.post_feedforward_layernorm(self.mlp(h))


@support_torch_compile
class Olmo2Model(nn.Module):
    # transformers' separate projections -> vLLM's fused ones
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1),
    })  # fmt: skip

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        config, pp = vllm_config.model_config.hf_config, get_pp_group()
        self.config = config
        tied_last = config.tie_word_embeddings and pp.is_last_rank
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if pp.is_first_rank or tied_last else PPMissingLayer())  # fmt: skip
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: Olmo2DecoderLayer(config, vllm_config.cache_config, vllm_config.quant_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["hidden_states"],
                                                                                       config.hidden_size)  # fmt: skip

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | IntermediateTensors:  # fmt: skip
        if get_pp_group().is_first_rank:
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            h = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            h = layer(positions, h)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h})
        return self.norm(h)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class Olmo2ForCausalLM(nn.Module, SupportsPP):
    # vLLM's fused projections and the checkpoint's parts of each (quantization configs name the parts)
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = Olmo2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))  # fmt: skip
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | IntermediateTensors:  # fmt: skip
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)  # a tied head's weight: loaded once, as the embedding
