"""Pipeline-parallel stages for an NBL checkpoint: where vLLM should cut the layers so the KV saving survives.

vLLM gives every pipeline stage the same number of KV blocks, the smallest any stage can hold, so the stage with the
most kept attention layers sets the capacity of all. By default vLLM cuts the layers evenly by count
(``vllm.distributed.utils.get_pp_indices``); the replaced layers cluster (at the end, on every model measured), so
one stage keeps all its attention and the capacity gain is lost: Llama-3.1-8B with its last 12 of 32 attention
layers replaced, PP = 2: stages of 16 and 16 layers keep 16 and 4 attention layers, capacity x1.0; stages of 10 and 22
layers keep 10 and 10, capacity x1.6. :func:`balanced_partition` finds the cut, which vLLM takes through its own
setting, ``VLLM_PP_LAYER_PARTITION`` (layer counts per stage)::

    python -m nbl.serve.partition <checkpoint> --pp 2     # prints the setting and the capacity per stage
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

ENV = "VLLM_PP_LAYER_PARTITION"


def vllm_default_partition(layers: int, stages: int) -> list[int]:
    """vLLM's own cut (0.32, ``get_pp_indices`` without the setting): equal counts, the remainder given to the
    stages before the last, from the second-to-last backwards."""
    counts = [layers // stages] * stages
    for i in range(2, layers % stages + 2):
        counts[-i] += 1
    return counts


def _stages(kept: Sequence[bool], counts: Sequence[int]) -> list[int]:
    """Kept attention layers per stage."""
    bounds = [sum(counts[:s]) for s in range(len(counts) + 1)]
    return [sum(kept[bounds[s] : bounds[s + 1]]) for s in range(len(counts))]


def _cuts(n: int, stages: int, fits: Callable[[int, int], bool]) -> list[int] | None:
    """Layer counts of ``stages`` contiguous non-empty stages covering ``n`` layers, each stage [a, b) with
    ``fits(a, b)``, preferring the fewest layers on the largest stage; None where none exists."""
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(0, 0): (0, [])}  # (stages, layers) -> (max layers, counts)
    for s in range(1, stages + 1):
        for b in range(s, n - (stages - s) + 1):
            options = [
                (max(best[(s - 1, a)][0], b - a), [*best[(s - 1, a)][1], b - a])
                for a in range(s - 1, b)
                if (s - 1, a) in best and fits(a, b)
            ]
            if options:
                best[(s, b)] = min(options)
    return best[(stages, n)][1] if (stages, n) in best else None


def balanced_partition(kept: Sequence[bool], stages: int) -> list[int]:
    """Layer counts per stage (contiguous, at least one layer each) with the fewest kept attention layers on the
    fullest stage (vLLM's KV blocks per stage follow it), then the fewest layers on the largest stage (its compute).

    ``kept``: per layer, whether its attention (and so its KV cache) is kept."""
    n = len(kept)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages for {n} layers: each stage needs a layer")
    prefix = [0]
    for k in kept:
        prefix.append(prefix[-1] + bool(k))
    for most in range(max(prefix[-1], 1) + 1):  # the smallest bound on kept layers per stage that some cut meets
        counts = _cuts(n, stages, lambda a, b, most=most: prefix[b] - prefix[a] <= most)
        if counts is not None:
            return counts
    raise AssertionError("unreachable: a bound of every kept layer always fits")


def capacity_gain(kept: Sequence[bool], counts: Sequence[int]) -> float:
    """KV capacity of the replaced model cut by ``counts`` over the unreplaced model cut by vLLM's default: the
    ratio of the fullest stages' attention layers (every stage gets the fullest one's block count)."""
    base = max(vllm_default_partition(len(kept), len(counts)))
    return base / max(max(_stages(kept, counts)), 1)


def report(kept: Sequence[bool], stages: int) -> dict[str, object]:
    """Both cuts, their kept attention layers per stage and capacity gains, and the setting that applies ours."""
    ours, default = balanced_partition(kept, stages), vllm_default_partition(len(kept), stages)

    def cut(counts: list[int]) -> dict[str, object]:
        return {"layers": counts, "kept_attention": _stages(kept, counts), "capacity_x": capacity_gain(kept, counts)}

    return {"setting": f"{ENV}={','.join(map(str, ours))}", "balanced": cut(ours), "vllm_default": cut(default)}


def checkpoint_kept(folder: Path) -> list[bool]:
    """Per layer of a checkpoint, whether its attention is kept (its config.json: layer count and replacement)."""
    config = json.loads((folder / "config.json").read_text())
    replaced = config.get("nbl", {}).get("replaced_layers", {})
    return [str(i) not in replaced for i in range(config["num_hidden_layers"])]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the pipeline cut that keeps an NBL checkpoint's KV saving")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages")
    args = parser.parse_args()
    print(json.dumps(report(checkpoint_kept(args.checkpoint), args.pp), indent=2))
