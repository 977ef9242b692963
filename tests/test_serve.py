"""Serving NBL checkpoints in vLLM (the plugin, nbl.serve): the same greedy tokens as transformers, no KV cache for
replaced layers, ordinary models untouched, bad checkpoints refused before anything loads; the OpenAI server."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nbl
from nbl.models import random_model, tiny_config
from nbl.serve.bench import ServeSettings, measure, transformers_greedy
from nbl.serve.vllm_plugin import CheckpointError, check_checkpoint

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
# vLLM's engine core in the calling process: an engine starts in 5-10 s instead of about a minute (the spawned
# process imports torch and vLLM again); the served results are the same. Benchmarks keep the default.
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# per checkpoint, its family and a mix of replacements: (part, mode, layers[, width, rank]); 4 layers each. Every
# family also with convolution maps (widths 2 and 3, full rank and two factors) beside the other modes.
REPLACEMENTS = {
    # routed experts (4, 2 active): a replaced layer keeps its routed block (or Qwen3-MoE's dense MLP of layer 1).
    # First: engines in one process share vLLM's parallel groups, made by the first engine, and only a MoE model's
    # first engine makes the expert-parallel group (each served alone in its own process needs no such order)
    "mixtral": [("attention", "linear", [1]), ("mlp", "linear", [2]), ("attention", "drop", [3])],
    "qwen3_moe": [("attention", "linear", [1]), ("block", "linear", [2]), ("mlp", "drop", [0])],
    "olmoe-conv": [("attention", "conv", [2], 2, 32), ("mlp", "linear", [1]), ("attention", "linear", [3])],
    "llama": [("attention", "linear", [1]), ("attention", "drop", [3]), ("mlp", "linear", [2])],
    "qwen2": [("mlp", "drop", [1]), ("attention", "linear", [3])],
    "phi3": [("attention", "linear", [2]), ("mlp", "linear", [1]), ("attention", "drop", [0])],
    # Granite: one tensor through its layers, each sub-block scaled by residual_multiplier before it is added
    "granite": [("attention", "linear", [1]), ("mlp", "linear", [2]), ("block", "linear", [0]), ("attention", "drop", [3])],
    # OLMo 2 (NBL's own vLLM model): norms after the sub-blocks only, q / k norms over the whole projections
    "olmo2": [("attention", "linear", [1]), ("mlp", "linear", [2]), ("block", "linear", [0]), ("attention", "drop", [3])],
    # Gemma: sliding (8-token windows, shorter than the prompts and continuations) and global layers, norms after
    # the attention and the MLP; Gemma 3's six layers are five sliding and one global
    "gemma2": [("attention", "linear", [1]), ("mlp", "linear", [2]), ("attention", "drop", [0])],
    "gemma3_text": [("attention", "linear", [5]), ("mlp", "drop", [1]), ("block", "linear", [3])],
    "gemma3_text-conv": [("attention", "conv", [2], 2, 32), ("attention", "linear", [4])],
    "llama-conv": [("attention", "conv", [1], 2, None), ("attention", "conv", [2], 2, 32), ("mlp", "linear", [3])],
    "mistral-conv": [("attention", "conv", [3], 3, 48), ("attention", "linear", [1]), ("block", "linear", [2])],
    "qwen2-conv": [("attention", "conv", [0, 2], 3, None), ("block", "drop", [3])],
    "qwen3-conv": [("attention", "conv", [2], 2, 64), ("attention", "conv", [1], 2, None), ("block", "drop", [3])],
}


SERVED_KV_GIB = 1 / 16  # each of the fixture's engines (all alive at once): 64 MiB, hundreds of the fixture's requests
W8A8_MIX = [("attention", "linear", [0]), ("attention", "conv", [2], 2, 32), ("mlp", "linear", [3])]


def _tiny(family: str):
    """A 4-layer model (Gemma 3: 6, one global layer) vLLM's CPU attention takes (head_dim 64) with the embedded
    tokenizer's vocabulary."""
    layers = 6 if family == "gemma3_text" else 4
    return random_model(tiny_config(family, hidden_size=256, num_layers=layers, vocab_size=49152), seed=0)


def _replaced(name: str, tokenizer, folder: Path, replacements: list | None = None, model=None) -> Path:
    model = model or _tiny(name.split("-")[0])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 49152, (2, 64), generator=g) for _ in range(12)]  # (T d) + 1 tokens for width 3
    for part, mode, layers, *conv in replacements or REPLACEMENTS[name]:
        stats = nbl.calibrate(model, batches, progress=False, part=part, width=conv[0] if conv else 1)
        nbl.linearize(model, stats, layers, mode=mode, part=part, rank=conv[1] if conv else None)
    return nbl.save_linearized(model, folder, tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    from nbl.models import load_smollm2

    return load_smollm2()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer, converted_models):
    """Every family's NBL checkpoint and the llama base, served in one process: greedy tokens, KV capacity."""
    from nbl.serve.quantized import save_w8a8

    root = tmp_path_factory.mktemp("serve")
    # no tokenizer in the served folders: the prompts are token ids, and vLLM then loads none (a second per engine)
    folders = {f: _replaced(f, None, root / f) for f in REPLACEMENTS}
    folders["llama-base"] = nbl.save_linearized(_tiny("llama"), root / "base")
    unquantized = _replaced("llama", None, root / "float", W8A8_MIX)  # the W8A8 checkpoint's source, not served
    folders["llama-w8a8"] = save_w8a8(nbl.load_linearized(unquantized), root / "w8a8")
    # one batch of prompts of different lengths, one of them a single token (shorter than a width-3 map's state)
    prompts = [tokenizer(p).input_ids for p in ("The capital of France is", "Once upon a time, in a small town", "A")]
    settings = ServeSettings(repeats=0, kv_cache_gib=SERVED_KV_GIB, enforce_eager=True, prompt_len=64,
                             long_prompt_len=64, batch_prompt_len=64, new_tokens=16)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in IN_PROCESS.items():
            mp.setenv(key, value)
        results = measure(folders, settings, greedy=prompts, greedy_tokens=16)
    return {**folders, "llama-float": unquantized}, prompts, results


@pytest.mark.parametrize("name", list(REPLACEMENTS))
def test_vllm_decodes_the_checkpoint_as_transformers_does(served, name):
    folders, prompts, results = served
    reference = transformers_greedy(nbl.load_linearized(folders[name]), prompts, 16)
    vllm = results[name]["greedy"]
    assert [[t for t, _ in row] for row in vllm] == [[t for t, _ in row] for row in reference]
    worst = max(abs(a[1] - b[1]) for r, v in zip(reference, vllm, strict=True) for a, b in zip(r, v, strict=True))
    assert worst < 1e-3, worst  # float32 on the CPU; measured: see docs/results.md


def test_replaced_attention_gets_no_kv_cache(served):
    _, _, results = served
    # llama: layers 1 and 3 lost their attention (the MLP replaced in layer 2 keeps its attention): 4 / 2 layers
    assert results["llama"]["kv_cache_tokens"] == 2 * results["llama-base"]["kv_cache_tokens"]


def test_conv_maps_get_a_state_page_per_sequence_instead_of_a_kv_cache(served):
    """llama-conv keeps the attention of 2 of 4 layers, as llama does; each of its two conv maps holds its state in
    one page per sequence, which vLLM pads to the size of a KV page (B tokens of one layer's keys and values,
    B = the base engine's block size): a request of M tokens takes 2 ceil(M / B) KV pages and 2 state pages, where
    llama's takes the KV pages alone. (At M = 80 a state page costs a whole KV page; at 2k-token requests 1 / 16.)"""
    _, _, results = served
    config = _tiny("llama").config
    max_len, budget = 64 + 16, SERVED_KV_GIB * 2**30  # the fixture's longest request and KV budget
    block = results["llama-base"]["block_size"]
    page = block * 2 * config.num_key_value_heads * config.head_dim * 4  # float32 keys and values
    for name, kept, state_pages in (("llama-base", 4, 0), ("llama", 2, 0), ("llama-conv", 2, 2)):
        per_request = kept * math.ceil(max_len / block) + state_pages
        assert budget / results[name]["max_concurrency"] == pytest.approx(page * per_request, rel=1e-3), name


def test_registering_leaves_ordinary_architectures_to_vllm():
    from vllm import ModelRegistry

    from nbl.serve.vllm_plugin import register

    register()
    register()  # vLLM loads plugins in every process it starts: twice must be harmless
    families = ("Llama", "Mistral", "Qwen2", "Qwen3")
    ours = [f"Nbl{conv}{family}ForCausalLM" for family in families for conv in ("", "Conv")]
    assert {ModelRegistry.models[name].module_name for name in ours} == {"nbl.serve.vllm_model"}
    for family in families:
        assert ModelRegistry.models[f"{family}ForCausalLM"].module_name.startswith("vllm.model_executor.models.")
    info = ModelRegistry.models["NblQwen3ForCausalLM"].inspect_model_cls()  # what vLLM learns of the class
    assert info.is_text_generation_model and info.supports_pp and not info.is_hybrid
    conv = ModelRegistry.models["NblConvQwen3ForCausalLM"].inspect_model_cls()
    assert conv.is_hybrid and conv.has_inner_state and conv.supports_pp


def test_bad_checkpoints_are_refused_before_anything_loads(tmp_path, tokenizer):
    folder = _replaced("llama", tokenizer, tmp_path / "ok")
    config = nbl.load_linearized(folder).config
    assert check_checkpoint(config, folder) == {"attention": {1: "linear", 3: "drop"}, "mlp": {2: "linear"}, "conv": {},
                                                "conv_width": None}  # fmt: skip
    plain = tiny_config("llama")
    with pytest.raises(CheckpointError, match=r"not a checkpoint written by nbl\.save_linearized"):
        check_checkpoint(plain)
    for change, message in (
        ({"format_version": 1}, r"format 1: this plugin serves \(2, 3\)"),
        ({"model_type": "qwen2"}, "made on a 'qwen2' model, but the config is of model_type 'llama'"),
        ({"replaced_layers": {"0": "linear", "1": "linear", "3": "drop"}}, "weights do not match the declared"),
        ({"replaced_layers": {"9": "linear"}}, "layers are 0..3"),
        ({"replaced_layers": {"one": "linear"}}, r"layer keys \['one'\] that are not layer indices"),
    ):
        config.nbl = {**json.loads((folder / "nbl.json").read_text()), **change}
        with pytest.raises(CheckpointError, match=message):
            check_checkpoint(config, folder)
    config.nbl = json.loads((folder / "nbl.json").read_text())
    olmo = tiny_config("olmo2")
    olmo.model_type, olmo.nbl = "nbl_olmo2", {**config.nbl, "model_type": "olmo2"}
    with pytest.MonkeyPatch.context() as mp:  # a family NBL replaces in transformers that the plugin would not serve
        mp.setattr("nbl.serve.vllm_plugin.SERVED_FAMILIES", ("llama",))
        with pytest.raises(CheckpointError, match=r"'nbl_olmo2': the plugin serves llama \(NBL replaces its layers"):
            check_checkpoint(olmo)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)  # the header intact, the last tensor cut short
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        check_checkpoint(config, folder)


def test_a_replaceme_checkpoint_is_served_by_vllm_without_the_plugin(tmp_path, tokenizer):
    """ReplaceMe folds its transform into an MLP: the checkpoint is the family's own with fewer layers, served by
    vLLM with every plugin off (VLLM_PLUGINS names none) as transformers alone decodes it."""
    from transformers import AutoModelForCausalLM

    from nbl.core.block_fits import fold_transform, replaceme_transforms
    from nbl.core.pruned import save_pruned

    model = _tiny("llama")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 49152, (2, 64), generator=g) for _ in range(4)]
    fold_transform(model, 0, replaceme_transforms(model, batches, [(1, 3)])[1])
    nbl.linearize(model, nbl.calibrate(model, batches, progress=False, part="block"), [1, 2], mode="drop", part="block")
    folder = save_pruned(model, tmp_path / "replaceme", tokenizer, replacement="replaceme")
    prompts = [tokenizer(p).input_ids for p in ("The capital of France is", "Once upon a time, in a small town")]
    settings = ServeSettings(repeats=0, kv_cache_gib=1, enforce_eager=True, prompt_len=64, long_prompt_len=64,
                             batch_prompt_len=64, new_tokens=16)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**IN_PROCESS, "VLLM_PLUGINS": "none-at-all"}.items():
            mp.setenv(key, value)
        served = measure({"replaceme": folder}, settings, greedy=prompts, greedy_tokens=16)["replaceme"]
    plain = transformers_greedy(AutoModelForCausalLM.from_pretrained(folder).eval(), prompts, 16)
    assert [[t for t, _ in row] for row in served["greedy"]] == [[t for t, _ in row] for row in plain]
    assert [[t for t, _ in row] for row in plain] == [[t for t, _ in row] for row in transformers_greedy(model, prompts, 16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_server_answers_with_the_greedy_text_of_transformers(tmp_path, tokenizer):
    """A Llama whose attention in two of four layers is replaced by the recommended maps (conv, width 2, rank
    d / 4), saved with the embedded tokenizer, behind vLLM's OpenAI-compatible server (loopback): the completion's
    text is transformers' greedy continuation, decoded."""
    from openai import OpenAI

    recommended = [("attention", "conv", [1, 2], 2, 256 // 4)]
    folder = _replaced("llama", tokenizer, tmp_path / "llama-recommended", recommended)
    model = nbl.load_linearized(folder)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:
                assert server.poll() is None and time.time() < deadline, server.stderr.read()[-3000:]
                time.sleep(2)
        prompt = "The capital of France is"
        answer = client.completions.create(model=str(folder), prompt=prompt, max_tokens=16, temperature=0)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert answer.choices[0].text == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
        assert answer.usage.completion_tokens == expected.shape[1] - ids.shape[1] > 0
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_speed_vllm_runs_in_the_app_and_reaches_results_and_the_report(tmp_path, nbl_cache):
    """``speed=vllm`` end to end: SmolLM2 with 4 attention layers replaced by conv maps of rank d / 4 (the
    recommended map, once refused), both models served alike; the served figures reach results.json, summary.md
    and the offline W&B run."""
    env = {**os.environ, **IN_PROCESS, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nbl", "speed=vllm", "eval=none", "logger=offline", "num_layers=4",
         "replacement=conv", "replacement.rank=0.25",
         "calibration.num_sequences=8", "calibration.seq_len=256", "calibration.batch_size=2",
         "speed.prompt_len=32", "speed.new_tokens=16", "speed.repeats=1", "speed.warmup=0",
         "speed.saturating_batch=4", "speed.batch_prompt_len=16", "speed.long_prompt_len=64",
         "speed.kv_cache_gib=0.5", "speed.enforce_eager=true", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    speed = results["speed"]
    assert speed["engine"] == "vllm" and "speed_error" not in results
    # (half a GiB: the KV-bound case sends about 90 requests at once; at a GiB, 180; the page grouping below is
    # that of this budget: at a quarter of a GiB the ratio is 0.947)
    # 4 of 30 layers keep no KV cache, but at requests of at most 80 tokens (one KV page per layer) their 4 state
    # pages cost 4 KV pages, and vLLM groups layers by the smaller count: the 26 attention layers become 7 groups of
    # 4 (2 padding layers). Per request: 28 + 4 pages against 30: vLLM's allocation, stated in docs/results.md
    assert speed["kv_capacity_ratio"] == pytest.approx(30 / 32, rel=1e-3)
    assert speed["kv_cache_tokens_nbl"] > 0 and speed["kv_cache_tokens_base"] > 0
    assert speed["prefix_cache_hits_base"] == speed["prefix_cache_hits_nbl"] == 0
    assert speed["throughput_speedup"] > 0 and speed["prefill_speedup"] > 0
    # decode is the difference of two request times: on a loaded machine one round may leave none (then None)
    assert all(speed[k] is None or speed[k] > 0 for k in ("decode_speedup", "long_decode_speedup"))
    assert "Served by vLLM: KV capacity x0.94" in (tmp_path / "run" / "summary.md").read_text()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run folder"


def test_the_cpu_head_sizes_validation_checks_are_vllms():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from nbl.serve import CPU_HEAD_SIZES

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


def _served_one_by_one(folder: Path, prompts: list[list[int]], tokens: int, **engine: object) -> dict:
    """Greedy tokens of each prompt, sent one at a time (a later prompt may hit an earlier one's cached prefix),
    from an engine made with ``engine`` settings; vLLM's prefix-cache hit count after."""
    code = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "job = json.loads(sys.argv[1])\n"
        "llm = LLM(job['folder'], dtype='float32', enforce_eager=True, seed=0, kv_cache_memory_bytes=2**28,\n"
        "          disable_log_stats=False, skip_tokenizer_init=True, **job['engine'])\n"
        "params = SamplingParams(max_tokens=job['tokens'], temperature=0.0, ignore_eos=True)\n"
        "out = [list(llm.generate([{'prompt_token_ids': p}], params, use_tqdm=False)[0].outputs[0].token_ids)\n"
        "       for p in job['prompts']]\n"
        "hits = sum(m.value for m in llm.get_metrics() if m.name == 'vllm:prefix_cache_hits')\n"
        "print('RESULT' + json.dumps({'tokens': out, 'hits': hits}))\n"
    )
    job = {"folder": str(folder), "prompts": prompts, "tokens": tokens, "engine": engine}
    env = {**os.environ, **IN_PROCESS, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_conv_state_survives_prefix_caching_and_chunked_prefill(tmp_path, tokenizer):
    """The conv maps' state through vLLM's prefix cache (a hit restores the state saved at a block boundary) and
    chunked prefill (each chunk continues from the state the last one left): tokens equal to transformers'."""
    folder = _replaced("qwen2-conv", tokenizer, tmp_path / "conv")
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 49152, (300,), generator=g).tolist()
    prompts = [text[:290], text[:290] + text[:5], text[:131], text[:291]]  # the later ones share the first's blocks
    served = _served_one_by_one(folder, prompts, 8, enable_prefix_caching=True, max_num_batched_tokens=64,
                                max_num_seqs=4, max_model_len=512)  # fmt: skip
    reference = transformers_greedy(nbl.load_linearized(folder), prompts, 8)
    assert served["tokens"] == [[t for t, _ in row] for row in reference]
    assert served["hits"] >= 256  # two later prompts each found the first's two full blocks: the path ran


def test_tensor_parallel_maps_are_split_and_exact(tmp_path, tokenizer):
    """TP = 2 on this CPU (vLLM's multiprocessing executor, one core per rank): linear, conv (full and factors) and
    MLP maps as parallel linears, each rank holding half of each (the same modules in every family), in an OLMo 2
    of one KV head that both ranks hold: its q / k norms span the whole projections, split over the ranks. Greedy
    tokens equal to transformers'."""
    mix = [("attention", "linear", [0]), ("attention", "conv", [1], 2, None), ("attention", "conv", [3], 2, 32),
           ("mlp", "linear", [2])]  # fmt: skip
    config = tiny_config("olmo2", hidden_size=256, num_layers=4, vocab_size=49152)
    config.num_key_value_heads = 1
    folder = _replaced("olmo2", tokenizer, tmp_path / "tp", mix, random_model(config, seed=0))
    prompts = [tokenizer(p).input_ids for p in ("The capital of France is", "A")]
    settings = ServeSettings(repeats=0, kv_cache_gib=0.25, enforce_eager=True, prompt_len=32, long_prompt_len=32,
                             batch_prompt_len=32, new_tokens=12, tensor_parallel_size=2)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's own binding wants a NUMA node per rank
        served = measure({"tp": folder}, settings, greedy=prompts, greedy_tokens=12)["tp"]["greedy"]
    reference = transformers_greedy(nbl.load_linearized(folder), prompts, 12)
    assert [[t for t, _ in row] for row in served] == [[t for t, _ in row] for row in reference]
    worst = max(abs(a[1] - b[1]) for r, v in zip(reference, served, strict=True) for a, b in zip(r, v, strict=True))
    assert worst < 1e-3, worst


def test_the_benchmark_never_hits_the_prefix_cache_and_fills_the_kv_budget(served, tokenizer, tmp_path):
    """Every timed request has a prompt of its own and the engines cache no prefixes (the old benchmark sent the
    same prompts every round: after the warm-up its prefills were cache hits). The KV-bound case sends as many long
    requests as vLLM says its budget holds, and none is preempted; half the attention layers hold twice as many."""
    folders, _, _ = served
    settings = ServeSettings(repeats=1, warmup=1, kv_cache_gib=0.0015, enforce_eager=True, prompt_len=32,
                             new_tokens=8, batch=4, batch_prompt_len=16, long_prompt_len=64)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in IN_PROCESS.items():
            mp.setenv(key, value)
        results = measure({"base": folders["llama-base"], "nbl": folders["llama"]}, settings)
    base, replaced = results["base"], results["nbl"]
    # the engines took the budget asked for (the legacy VLLM_CPU_KVCACHE_SPACE once rounded it up to whole GiB)
    assert base["kv_cache_bytes"] == replaced["kv_cache_bytes"] == int(settings.kv_cache_gib * 2**30)
    assert base["prefix_cache_hits"] == replaced["prefix_cache_hits"] == 0
    assert base["preemptions"] == replaced["preemptions"] == 0
    assert replaced["concurrent_requests"] >= 2 * base["concurrent_requests"] > 0
    assert base["concurrent_requests"] == int(base["max_concurrency"])
    assert replaced["concurrent_tok_s"] > 0 and base["concurrent_tok_s"] > 0


def test_evaluation_through_vllm_agrees_with_transformers(served, tokenizer, tmp_path):
    """``eval.backend=vllm``: the same lm-eval task and perplexity windows on a conv checkpoint served by vLLM
    (lm-eval's vllm model, prompt log-probabilities) as on the model in transformers."""
    from omegaconf import OmegaConf

    from nbl.recipe.assess import evaluate_model

    folders, _, _ = served
    model = nbl.load_linearized(folders["llama-conv"])
    settings = {"tasks": ["piqa"], "limit": 12, "batch_size": 8, "num_fewshot": {}, "offline": True, "domains": [],
                "perplexity": {"source": "wikipedia", "seq_len": 128, "num_sequences": 2}, "kv_cache_gib": 0.25}  # fmt: skip
    hf = evaluate_model(model, tokenizer, OmegaConf.create({**settings, "backend": "hf"}), tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in IN_PROCESS.items():
            mp.setenv(key, value)
        engine = evaluate_model(model, tokenizer, OmegaConf.create({**settings, "backend": "vllm"}), tmp_path)
    assert engine["backend"] == "vllm" and hf["backend"] == "hf" and engine["seconds"] > 0
    for metric in ("acc", "acc_norm"):
        a, b = hf["tasks"]["piqa"][metric], engine["tasks"]["piqa"][metric]
        assert abs(a - b) <= hf["tasks"]["piqa"][f"{metric}_stderr"], (metric, a, b)
    assert engine["perplexity"] == pytest.approx(hf["perplexity"], rel=0.01)


def test_a_w8a8_quantized_nbl_checkpoint_is_served_as_transformers_computes_it(served):
    """Kept layers compressed-tensors W8A8 int8 (vLLM's CPU int8 kernels), maps in float32 (linear, conv factors,
    an MLP map): vLLM's greedy tokens equal those of the same arithmetic in transformers (weights on their int8
    grid, inputs rounded per token), log-probabilities within a stated tolerance (int8 rounding of an input can
    flip where float sums differ in their last bits)."""
    from safetensors import safe_open

    from nbl.serve.quantized import fake_w8a8

    folders, prompts, results = served
    folder, source = folders["llama-w8a8"], folders["llama-float"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.attn_linear.weight").dtype == torch.float32  # maps stay as they are
        assert f.get_tensor("model.layers.3.mlp.linear.weight").dtype == torch.float32
    served_rows = results["llama-w8a8"]["greedy"]
    reference = transformers_greedy(fake_w8a8(nbl.load_linearized(source)), prompts, 16)
    unquantized = transformers_greedy(nbl.load_linearized(source), prompts, 16)
    assert [[t for t, _ in row] for row in served_rows] == [[t for t, _ in row] for row in reference]

    def worst(rows: list) -> float:
        return max(abs(a[1] - b[1]) for r, v in zip(rows, served_rows, strict=True) for a, b in zip(r, v, strict=True)
                   if a[0] == b[0])  # fmt: skip

    # measured: 0.006 against the W8A8 arithmetic, 0.016 against the float model (vLLM did quantize)
    assert worst(reference) < 1e-2 and worst(reference) < worst(unquantized), (worst(reference), worst(unquantized))
