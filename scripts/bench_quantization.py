"""Base, NBL, quantized and NBL + quantized side by side on the embedded SmolLM2-135M (fp32, CPU).

    python scripts/bench_quantization.py [--k 8] [--scheme int8_weight] [--repeats 5] [--out docs/results/quantization]

The four models live in one process: prefill and cached-decode times are interleaved after warm-up (medians),
so every speed-up is a ratio measured in the same run. Perplexity on the Wikipedia stand-in and on SciQ
passages (16 x 512 tokens each). NBL: the CCA bound's k layers from 32 x 512 LAMBADA calibration tokens
(the default run's setting), linear maps.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import nbl
from nbl.data import load_texts, token_sequences
from nbl.measure.evaluation import perplexity
from nbl.measure.speed import decode_timer, interleaved, prefill, random_prompt, timed
from nbl.models import load_smollm2
from nbl.quantization import SCHEMES, quantize_model
from nbl.select.ranking import select_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--scheme", choices=[s for s in SCHEMES if s != "none"], default="int8_weight")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-sequences", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results/quantization"))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    calibration = token_sequences(tokenizer, load_texts("lambada"), 32, 512, seed=0)
    stats = nbl.calibrate(model, list(calibration.split(4)))
    chosen = select_layers({i: nbl.cca_bound(stats[i]) for i in stats}, args.k, lowest_first=True)
    linearized = copy.deepcopy(model)
    nbl.linearize(linearized, stats, chosen)
    models = {"base": model, "NBL": linearized}
    for name in ("base", "NBL"):
        quantized = copy.deepcopy(models[name])
        quantize_model(quantized, args.scheme)
        models[f"{name} + {args.scheme}"] = quantized

    texts = {
        d: token_sequences(tokenizer, load_texts(d), args.ppl_sequences, 512, seed=0) for d in ("wikipedia", "sciq")
    }
    prompt = random_prompt(model, 1, args.prompt_len)
    timers = {}
    for name, m in models.items():
        timers[f"prefill/{name}"] = timed(lambda m=m: prefill(m, prompt))
        timers[f"decode/{name}"] = decode_timer(m, prompt, args.new_tokens)
    times = interleaved(timers, repeats=args.repeats, warmup=1)

    rows = []
    for name, m in models.items():
        prefill_s, decode_s = times[f"prefill/{name}"].median_s, times[f"decode/{name}"].median_s
        rows.append(
            {
                "model": name,
                "perplexity": perplexity(m, texts["wikipedia"]),
                "ppl/sciq": perplexity(m, texts["sciq"]),
                "prefill_tok_s": args.prompt_len / prefill_s,
                "decode_tok_s": args.new_tokens / decode_s,
                "prefill_x": times["prefill/base"].median_s / prefill_s,
                "decode_x": times["decode/base"].median_s / decode_s,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"k": args.k, "layers": chosen, "scheme": args.scheme, "repeats": args.repeats,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}  # fmt: skip
    (args.out / "bench.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.2f}" for v in r.values()) + " |")
    table = "\n".join(lines) + "\n"
    (args.out / "bench.md").write_text(f"Settings: {json.dumps(meta)}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
