"""Richer closed-form attention replacements than the paper's one-token map, measured on SmolLM2 (issue 21).

    python scripts/map_variants.py --out docs/results/map_variants      # calibration 7 min, then 1-2 min a map and k

Every variant is an LMMSE fit a_t ~ W f_t + b of the attention output a_t on features f_t of the residual stream
entering the layer, from one calibration pass (the default: 32 x 512 LAMBADA tokens), all fitted from one set of
joint second moments (the features' covariance blocks are sub-blocks of the largest set's):

- x: f_t = x_t (the paper's map);
- prev: f_t = [x_t, x_(t-1)] (x_(-1) = 0), a causal convolution of width 2; conv3: width 3;
- mean: f_t = [x_t, mean_(s<=t) x_s] (the running mean of the stream: a decode state of one vector and a count);
- "rank d/2", "rank d/4", ...: the map cut to rank r by reduced-rank regression (``nbl.core.linalg.reduce_rank``):
  two thin factors, 2 r (d + f) FLOPs per token for f input features instead of 2 d f;
- ", ridge r": fitted with ``replacement.ridge`` r (r tr(C_ff) / f added to C_ff's diagonal);
- "+sink": the first position of a sequence is computed exactly and the maps are fitted on the others (or, to
  see what the fit alone gains, on all positions). With one
  key, attention returns that key's value: a_0 = W_o expand(W_v LN1(x_0)), one d x d product per layer that only
  the prefill's first token uses. Later layers attend heavily to that position (the attention sink), so an error
  there reaches every later token.

The layers are the ones `selection=recommended` chose at each k (docs/results.md, "Validated selection"), so the
maps alone differ; perplexity on the Wikipedia stand-in and SciQ (16 x 512 tokens each, the windows the app uses).
Writes map_variants.json (runs already in it are kept and not redone) and map_variants.md, where each map's cost
per replaced layer stands beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from nbl.core.linalg import fit_lmmse, reduce_rank
from nbl.core.stats import CovarianceAccumulator
from nbl.data import lambada_passages, load_texts, token_sequences
from nbl.measure.evaluation import perplexity
from nbl.models import load_smollm2

# selection=recommended on SmolLM2 (docs/results/validated/report.md)
LAYERS = {
    4: [6, 7, 8, 29],
    8: [6, 7, 8, 24, 26, 27, 28, 29],
    12: [6, 7, 8, 15, 17, 22, 24, 25, 26, 27, 28, 29],
    16: [5, 6, 7, 8, 9, 15, 17, 18, 19, 22, 24, 25, 26, 27, 28, 29],
}
BLOCKS = ("x", "prev", "prev2", "mean")  # the joint feature vector, d each
# name -> (feature blocks, first position exact, the positions the map is fitted on, rank as a fraction of d[,
# ridge])
VARIANTS = {
    "x": (("x",), False, "all", None),
    "x+sink (fit on all)": (("x",), True, "all", None),
    "x+sink": (("x",), True, "rest", None),
    "prev": (("x", "prev"), False, "all", None),
    "prev+sink": (("x", "prev"), True, "rest", None),
    "conv3": (("x", "prev", "prev2"), False, "all", None),
    "conv3+sink": (("x", "prev", "prev2"), True, "rest", None),
    "mean+sink": (("x", "mean"), True, "rest", None),
    "prev+mean+sink": (("x", "prev", "mean"), True, "rest", None),
    "x rank d/2": (("x",), False, "all", 1 / 2),
    "x rank d/4": (("x",), False, "all", 1 / 4),
    "x rank d/8": (("x",), False, "all", 1 / 8),
    "prev rank d/4": (("x", "prev"), False, "all", 1 / 4),
    "mean, ridge 1e-3": (("x", "mean"), False, "all", None, 1e-3),
    "prev+mean, ridge 1e-3": (("x", "prev", "mean"), False, "all", None, 1e-3),
}


def features(x: torch.Tensor) -> torch.Tensor:
    """(B, S, d) -> (B, S, 4d): [x_t, x_(t-1), x_(t-2), mean_(s<=t) x_s], zeros before the sequence starts."""
    prev = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]
    prev2 = torch.nn.functional.pad(x, (0, 0, 2, 0))[:, :-2]
    mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
    return torch.cat([x, prev, prev2, mean], dim=-1)


def select(f: torch.Tensor, blocks: tuple[str, ...], d: int) -> torch.Tensor:
    return torch.cat([f[..., BLOCKS.index(b) * d : (BLOCKS.index(b) + 1) * d] for b in blocks], dim=-1)


def sub_accumulator(acc: CovarianceAccumulator, blocks: tuple[str, ...], d: int) -> CovarianceAccumulator:
    """The statistics of a subset of the feature blocks (sub-blocks of the joint sums)."""
    idx = torch.cat([torch.arange(BLOCKS.index(b) * d, (BLOCKS.index(b) + 1) * d) for b in blocks])
    out = CovarianceAccumulator(len(idx), acc.d_out)
    out.sum_x, out.sum_a, out.sum_aa = acc.sum_x[idx], acc.sum_a, acc.sum_aa
    out.sum_xx, out.sum_ax, out.count = acc.sum_xx[idx][:, idx], acc.sum_ax[:, idx], acc.count
    return out


def first_position(layer: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """The attention output at a sequence's first position, exactly: the value of its only key, projected."""
    attn = layer.self_attn
    v = attn.v_proj(layer.input_layernorm(x0))  # (B, kv_heads * head_dim)
    groups = attn.config.num_attention_heads // attn.config.num_key_value_heads
    v = v.view(*v.shape[:-1], -1, attn.head_dim).repeat_interleave(groups, dim=-2).flatten(-2)
    return attn.o_proj(v)


class Replaced(nn.Module):
    """A decoder layer whose attention became a map of the features (the original layer kept for its MLP and,
    with ``sink``, for the first position's value path)."""

    def __init__(self, layer: nn.Module, w: torch.Tensor, b: torch.Tensor, blocks: tuple[str, ...], sink: bool):
        super().__init__()
        self.layer, self.blocks, self.sink = layer, blocks, sink
        self.w, self.b = w.float(), b.float()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = hidden_states
        d = x.shape[-1]
        a = select(features(x), self.blocks, d) @ self.w.T + self.b
        if self.sink:
            a = torch.cat([first_position(self.layer, x[:, :1]), a[:, 1:]], dim=1)
        h = x + a
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))


@torch.no_grad()
def calibrate(model, batches: list[torch.Tensor]) -> dict[str, dict[int, CovarianceAccumulator]]:
    """Per layer, the joint statistics of [features, attention output]: on every position, and without the first."""
    d = model.config.hidden_size
    layers = model.model.layers
    stats = {part: {i: CovarianceAccumulator(4 * d, d) for i in range(len(layers))} for part in ("first", "rest")}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))

        def hook(m, args, out, i=i):
            x, a = inputs.pop(i), out[0]
            f = features(x.double())
            first = torch.zeros(x.shape[:2], dtype=torch.bool)
            first[:, 0] = True
            stats["first"][i].update(f, a, first)
            stats["rest"][i].update(f, a, ~first)

        handles.append(layer.self_attn.register_forward_hook(hook))
    try:
        for n, batch in enumerate(batches):
            model(batch, use_cache=False)
            print(f"calibration batch {n + 1}/{len(batches)}", flush=True)
    finally:
        for h in handles:
            h.remove()
    stats["all"] = {i: copy.deepcopy(acc).merge(stats["first"][i]) for i, acc in stats["rest"].items()}
    return stats


def original_attention(model) -> nn.Module:
    return model.model.layers[0].self_attn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/map_variants"))
    parser.add_argument("--eval-sequences", type=int, default=16)
    parser.add_argument("--ks", type=int, nargs="+", default=sorted(LAYERS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--table", action="store_true", help="only rewrite map_variants.md from the JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        write_table(args.out, json.loads((args.out / "map_variants.json").read_text()))
        return
    model, tokenizer = load_smollm2()
    d = model.config.hidden_size
    start = time.perf_counter()
    stats = calibrate(model, list(token_sequences(tokenizer, lambada_passages(), 32, 512, seed=0).split(4)))
    calibration_s = time.perf_counter() - start
    texts = {s: token_sequences(tokenizer, load_texts(s), args.eval_sequences, 512, seed=0) for s in ("wikipedia", "sciq")}
    results = {
        "base": {s: perplexity(model, ids) for s, ids in texts.items()},
        "calibration_s": calibration_s,
        "hidden_size": d,
        "attention_flops": 2 * sum(p.numel() for p in original_attention(model).parameters() if p.dim() == 2),
        "runs": [],
    }
    done = args.out / "map_variants.json"
    if done.is_file():  # measured by an earlier run of this script (same calibration and texts): kept, not redone
        results["runs"] = json.loads(done.read_text())["runs"]
    print("base", results["base"], flush=True)
    original = list(model.model.layers)
    maps: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for k in args.ks:  # k-major: every variant at one k before the next k
        for name in args.variants:
            if any(r["variant"] == name and r["k"] == k for r in results["runs"]):
                continue
            blocks, sink, fit_on, rank, *ridge = VARIANTS[name]
            for i in LAYERS[k]:
                if (name, i) not in maps:
                    acc = sub_accumulator(stats[fit_on][i], blocks, d)
                    maps[name, i] = fit_lmmse(acc, ridge=ridge[0] if ridge else 0.0)
                    if rank is not None:  # evaluated as the d x d product U V: the same function
                        u, v, b = reduce_rank(maps[name, i][0], acc, round(rank * d))
                        maps[name, i] = (u @ v, b)
                model.model.layers[i] = Replaced(original[i], *maps[name, i], blocks, sink)
            run = {"variant": name, "k": k, "layers": LAYERS[k], **{s: perplexity(model, ids) for s, ids in texts.items()}}
            results["runs"].append(run)
            print(run, flush=True)
            for i in LAYERS[k]:
                model.model.layers[i] = original[i]
            (args.out / "map_variants.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "map_variants.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(args.out, results)


def write_table(out: Path, results: dict) -> None:
    """Every map and k the JSON holds (this run's and earlier runs'), ks ascending."""
    ks = sorted({r["k"] for r in results["runs"]})
    variants = list(dict.fromkeys(r["variant"] for r in results["runs"]))
    (out / "map_variants.md").write_text(table(results, ks, variants))
    print(table(results, ks, variants))


def costs(name: str, d: int, attention_flops: int) -> dict[str, float]:
    """Per replaced layer: the float64 calibration sums the fit needs (MB), the map's FLOPs per token (as a
    fraction of the attention projections' at zero context) and its bf16 weight bytes (MB)."""
    blocks, _, _, rank, *_ = VARIANTS[name]
    f = len(blocks) * d
    params = round(rank * d) * (d + f) if rank is not None else f * d  # U (d x r) and V (r x f), or W
    return {
        "statistics_mb": 8 * (f * f + f * d + d * d + f + d) / 1e6,
        "flops_vs_attention": 2 * params / attention_flops,
        "bf16_mb": 2 * (params + d) / 1e6,
    }


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.1e}"


def table(results: dict, ks: list[int], variants: list[str]) -> str:
    base, d, attention_flops = results["base"], results["hidden_size"], results["attention_flops"]
    lines = [
        f"Perplexity, Wikipedia stand-in / SciQ (base {base['wikipedia']:.2f} / {base['sciq']:.2f}); layers: "
        "selection=recommended's at each k. Cost per replaced layer: the calibration sums the fit needs (float64),",
        "the map's FLOPs per token over the attention projections' (q, k, v, o; the context-dependent part comes on",
        "top of those), and its weights in bf16.",
        "",
        "| map | " + " | ".join(f"k = {k}" for k in ks) + " | statistics | FLOPs / attention's | weights |",
        "|---|" + "---|" * (len(ks) + 3),
    ]
    for name in variants:
        cells = {r["k"]: f"{_ppl(r['wikipedia'])} / {_ppl(r['sciq'])}" for r in results["runs"] if r["variant"] == name}
        c = costs(name, d, attention_flops)
        lines.append(
            f"| {name} | " + " | ".join(cells.get(k, "-") for k in ks)
            + f" | {c['statistics_mb']:.1f} MB | {c['flops_vs_attention']:.2f} | {c['bf16_mb']:.2f} MB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
