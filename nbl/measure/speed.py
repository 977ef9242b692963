"""Speed measurements that can be trusted: warm-up, interleaved repetitions, medians, device sync.

Decode really passes the KV cache from step to step (one new token per forward).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, StaticCache

from nbl.core.decode_state import state_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    samples: int


def timed(fn: Callable[[], object], device: torch.device | None = None) -> Callable[[], float]:
    """Wrap ``fn`` into a callable that returns its own wall time, device synchronised."""
    dev = device or torch.device("cpu")

    def run() -> float:
        synchronize(dev)
        start = time.perf_counter()
        fn()
        synchronize(dev)
        return time.perf_counter() - start

    return run


def interleaved(fns: Mapping[str, Callable[[], float]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Run each timing callable ``repeats`` times round-robin (A B A B ...) after ``warmup`` untimed rounds.

    Each callable returns the seconds it measured (see :func:`timed`, :func:`decode_timer`).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = fn()
            if round_ >= warmup:
                samples[name].append(seconds)
    return {n: Timing(statistics.median(s), min(s), max(s), len(s)) for n, s in samples.items()}


def random_prompt(model: PreTrainedModel, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def prefill(model: PreTrainedModel, ids: torch.Tensor) -> DynamicCache:
    """The prompt pass of generation: fills a fresh cache, logits for the last position only."""
    return _start(model, ids)[0].past_key_values


def _start(model: PreTrainedModel, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
    out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return out, out.logits[:, -1:].argmax(-1)


def _steps(model: PreTrainedModel, out: object, token: torch.Tensor, new_tokens: int) -> DynamicCache:
    for _ in range(new_tokens):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return out.past_key_values


def static_cache(model: PreTrainedModel, max_cache_len: int) -> StaticCache:
    """A StaticCache for ``model``: it allocates keys and values for the kept attentions' slots only (slots are
    allocated when first written; the replaced layers' slots hold no keys or values, :mod:`nbl.core.decode_state`)."""
    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)


@torch.no_grad()
def static_decode(
    model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, step: Callable[..., object] | None = None
) -> tuple[torch.Tensor, StaticCache]:
    """Greedy decoding with a compact static cache: (the new tokens, the cache).

    ``step`` runs the single-token steps (default: ``model`` itself; pass a ``torch.compile``-d forward
    for the compiled protocol: shapes never change, so it compiles once). The prefill runs eagerly.
    """
    step = step or model
    n = ids.shape[1]
    cache = static_cache(model, n + new_tokens)
    position = torch.arange(n, device=ids.device)
    out = model(ids, past_key_values=cache, cache_position=position, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    for t in range(new_tokens - 1):
        position = torch.tensor([n + t], device=ids.device)
        out = step(token, past_key_values=cache, cache_position=position, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1), cache


def compiled_step(model: PreTrainedModel, mode: str | None = None) -> Callable[..., object]:
    """``model.forward`` compiled for fixed-shape single-token steps (``mode="reduce-overhead"`` on CUDA
    adds CUDA graphs: the step is then bound by memory traffic, see :class:`nbl.core.accounting.BytesModel`)."""
    return torch.compile(model.forward, mode=mode, dynamic=False, fullgraph=False)


@torch.no_grad()
def cached_decode(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> DynamicCache:
    """Greedy decoding of ``new_tokens`` tokens after a prefill, one token per step, cache carried over."""
    return _steps(model, *_start(model, ids), new_tokens)


def decode_timer(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> Callable[[], float]:
    """A timing callable for cached decoding: prefill untimed, then ``new_tokens`` single-token steps timed."""

    @torch.no_grad()
    def run() -> float:
        out, token = _start(model, ids)
        synchronize(ids.device)
        start = time.perf_counter()
        _steps(model, out, token, new_tokens)
        synchronize(ids.device)
        return time.perf_counter() - start

    return run


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes a cache holds: keys and values (slots never written hold none), and convolution maps' inputs."""
    total = state_bytes(cache)
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied parameters once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_memory(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> dict[str, int | None]:
    """Memory of ``model`` as if it were alone on its device, during a cached decode.

    ``peak_memory_bytes`` (CUDA only) = the model's own weights + the peak of what the decode allocated
    beyond what was already resident. Other models and statistics on the device (the base copy of an
    interleaved speed test) are therefore not counted.
    """
    device = ids.device
    resident = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    cache = cached_decode(model, ids, new_tokens)
    weights = model_bytes(model)
    peak = None
    if resident is not None:
        torch.cuda.synchronize(device)
        peak = weights + torch.cuda.max_memory_allocated(device) - resident
    return {"kv_cache_bytes": cache_bytes(cache), "weights_bytes": weights, "peak_memory_bytes": peak}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux VmHWM)."""
    return _proc_status_bytes("VmHWM")


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")
