"""The field's training-free methods (ShortGPT, SLEB, ReplaceMe, LinearPatch, FinerCut) pinned to their papers: each
score, order and transform against an independent computation on a tiny model (numpy least squares, hand-computed
block influence and angular distances, brute-force greedy orders on physically pruned copies), folded weights
against the unfolded transform, and the ordinary checkpoint against plain transformers in a fresh process."""

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import nbl
from nbl.calib.stream import runs
from nbl.core.block_fits import fold_transform, linearpatch_matrix, linearpatch_scales, replaceme_transforms
from nbl.core.hadamard import hadamard
from nbl.core.pruned import removed_blocks, save_pruned
from nbl.recipe.schema import ConfigError, checked_config
from nbl.select.damage import greedy_joint_drop, js_divergence
from nbl.select.registry import PartStatistics, SelectionInputs, get_strategy
from nbl.select.strategies.replaceme import run_distances
from tests.conftest import make_tiny, token_batches

CONF = Path(__file__).resolve().parents[1] / "conf"


def _pruned_copy(model, removed):
    """An independent removal: a deep copy whose decoder stack physically lacks the ``removed`` layers."""
    pruned = copy.deepcopy(model)
    pruned.model.layers = torch.nn.ModuleList(m for i, m in enumerate(pruned.model.layers) if i not in removed)
    pruned.config.num_hidden_layers = len(pruned.model.layers)
    return pruned


def _hidden(model, batches):
    """hidden_states of transformers (boundary b < L: the stream entering layer b), per batch, float64."""
    with torch.no_grad():
        return [[h.double() for h in model(b, output_hidden_states=True, use_cache=False).hidden_states] for b in batches]


def _loss(model, batches) -> float:
    with torch.no_grad():
        return float(np.mean([float(model(b, labels=b, use_cache=False).loss) for b in batches]))


# --- ShortGPT -------------------------------------------------------------------------------------------------


def test_shortgpt_block_influence_is_one_minus_the_mean_token_cosine_of_block_input_and_output():
    model, batches = make_tiny(num_layers=5), token_batches(n_batches=2)
    stats = nbl.calibrate(model, batches, progress=False, part="block")
    scores = get_strategy("shortgpt").layer_scores(PartStatistics(stats, OmegaConf.create({})))
    hidden = _hidden(model, batches)
    for i in range(4):  # the last boundary of transformers' hidden_states is after the final norm
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).flatten() for h in hidden])
        assert scores[i] == pytest.approx(1 - float(cos.mean()), abs=1e-5)


# --- SLEB -----------------------------------------------------------------------------------------------------


def _inputs(model, stats, heldout, k, tmp_path, strategy, calibration=()):
    cfg = OmegaConf.create({"num_layers": k, "layers": None, "selection": {"strategy": strategy, "measure": "loss"},
                            "replacement": {"mode": "drop", "ridge": 0.0, "granularity": "block"}})  # fmt: skip
    return SelectionInputs(
        cfg=cfg, config=model.config, model=model, stats=stats, heldout_stats={}, ridges=dict.fromkeys(stats, 0.0),
        heldout=lambda: heldout, calibration=lambda: list(calibration), scores={}, measured_key={"test": str(tmp_path)},
        cache_dir=tmp_path, probe_settings={"mode": "drop", "ridge": 0.0, "granularity": "block"},
    )  # fmt: skip


def test_sleb_removes_blocks_in_the_order_brute_force_perplexity_gives(tmp_path):
    model, heldout = make_tiny(num_layers=5, seed=3), token_batches(n_batches=2, seed=9)
    stats = {"block": nbl.calibrate(model, token_batches(n_batches=2), progress=False, part="block")}
    chosen = get_strategy("sleb").select(_inputs(model, stats, heldout, 3, tmp_path, "sleb"))
    removed: list[int] = []
    for _ in range(3):  # SLEB by brute force: the removal whose pruned copy has the lowest perplexity
        losses = {i: _loss(_pruned_copy(model, [*removed, i]), heldout) for i in range(5) if i not in removed}
        removed.append(min(losses, key=losses.get))
    assert [s["layer"] for s in chosen.steps] == removed and chosen.layers == {"block": sorted(removed)}


# --- ReplaceMe ------------------------------------------------------------------------------------------------


def test_replaceme_chooses_the_run_of_least_angular_distance_between_its_ends():
    model, batches = make_tiny(num_layers=6, seed=1), token_batches(n_batches=3, seed=2)
    n = 2
    distances = run_distances(model, batches, 6, n)
    assert sorted(distances) == [1, 2, 3, 4]  # block 0 never starts a run
    hidden = _hidden(model, batches)
    for s in (1, 2, 3):  # boundary s + n < L: transformers' hidden states hold the raw stream there
        a = np.concatenate([h[s][:, -1].numpy() for h in hidden])
        b = np.concatenate([h[s + n][:, -1].numpy() for h in hidden])
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert distances[s] == pytest.approx(float(np.mean(np.arccos(np.clip(cos, -1, 1)) / math.pi)), abs=1e-9)


def test_replaceme_transform_is_the_least_squares_solution_and_folds_exactly(tmp_path):
    model, batches = make_tiny(num_layers=6, seed=4), token_batches(n_batches=3, seed=5)
    s, e = 2, 4
    mlp_out = []
    hook = model.model.layers[s - 1].mlp.register_forward_hook(lambda m, a, out: mlp_out.append(out.double()))
    hidden = _hidden(model, batches)
    hook.remove()
    m = torch.cat([o.reshape(-1, 64) for o in mlp_out]).numpy()
    target = torch.cat([(h[e] - h[s]).reshape(-1, 64) for h in hidden]).numpy() + m
    expected = np.linalg.lstsq(m, target, rcond=None)[0]
    transform = replaceme_transforms(model, batches, [(s, e)])[s]
    np.testing.assert_allclose(transform.numpy(), expected, atol=1e-8)
    alpha = 0.1 * np.trace(m.T @ m) / 64  # ridge 0.1, relative to the MLP output's scale
    ridged = np.linalg.solve(m.T @ m + alpha * np.eye(64), m.T @ target)
    np.testing.assert_allclose(replaceme_transforms(model, batches, [(s, e)], ridge=0.1)[s].numpy(), ridged, atol=1e-8)

    unfolded = _pruned_copy(model, range(s, e))  # the transform applied after the MLP, in a copy
    unfolded.model.layers[s - 1].mlp.register_forward_hook(lambda m, a, out: (out.double() @ transform).to(out.dtype))
    fold_transform(model, s - 1, transform)
    nbl.linearize(model, nbl.calibrate(model, batches, progress=False, part="block"), range(s, e), mode="drop",
                  part="block")  # fmt: skip
    ids = token_batches(n_batches=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unfolded(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)

    folder = save_pruned(model, tmp_path / "pruned", replacement="replaceme")
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    assert not (folder / "nbl.json").exists() and removed_blocks(model) == [2, 3]
    out = _plain_transformers_logits(folder, ids, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=1e-5)


PLAIN = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
assert "nbl" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    save_file({"logits": model(load_file(sys.argv[2])["ids"]).logits}, sys.argv[3])
"""


def _plain_transformers_logits(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The checkpoint loaded by transformers alone (no nbl) in a fresh process."""
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(folder), str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return load_file(str(tmp_path / "out.safetensors"))["logits"]


def test_an_ordinary_checkpoint_refuses_maps_it_cannot_hold(tmp_path):
    model, batches = make_tiny(), token_batches(n_batches=2)
    nbl.linearize(model, nbl.calibrate(model, batches, progress=False), [1], mode="linear")
    with pytest.raises(ValueError, match="other than whole-block drops"):
        save_pruned(model, tmp_path / "x")


# --- LinearPatch ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 64, 72, 576, 896])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_hadamard_refuses_orders_it_cannot_build():
    with pytest.raises(ValueError, match="order 52"):
        hadamard(52)  # 51 and 25 are not primes: no Paley construction here


def test_linearpatch_scales_and_patch_match_the_published_hook(tmp_path):
    model, batches = make_tiny(num_layers=6, seed=6), token_batches(n_batches=2, seed=3)
    s, e = 2, 5
    hidden = _hidden(model, batches)
    h = hadamard(64).numpy()
    ratios = [np.abs(hb[e][r].numpy() @ h).mean(0) / np.abs(hb[s][r].numpy() @ h).mean(0)
              for hb in hidden for r in range(hb[s].shape[0])]  # fmt: skip
    scales = linearpatch_scales(model, batches, [(s, e)])[s]
    np.testing.assert_allclose(scales.numpy(), np.mean(ratios, axis=0), rtol=1e-9)
    patch = linearpatch_matrix(scales)
    np.testing.assert_allclose(patch.numpy(), h @ np.diag(scales.numpy()) @ h.T, atol=1e-12)

    published = _pruned_copy(model, range(s, e))  # the authors' way: a hook on the output of the block before the cut
    published.model.layers[s - 1].register_forward_hook(
        lambda m, a, out: (out[0] if isinstance(out, tuple) else out).double().matmul(patch).float()
    )
    state = SimpleNamespace(
        model=model, config=model.config, windows=SimpleNamespace(calibration=lambda: batches), results={"calibration": {}},
        selection=SimpleNamespace(layers={"block": list(range(s, e))}),
        stats={"block": nbl.calibrate(model, batches, progress=False, part="block")},
    )  # fmt: skip
    from nbl.replace.registry import get_replacement

    get_replacement("linearpatch").apply(state)
    assert nbl.replaced_layers(model) == {2: "linear", 3: "drop", 4: "drop"}
    ids = token_batches(n_batches=1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, published(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_runs_split_a_block_selection_into_maximal_consecutive_runs():
    assert runs([7, 2, 3, 4, 9, 10]) == [(2, 5), (7, 8), (9, 11)] and runs([]) == []


# --- FinerCut -------------------------------------------------------------------------------------------------


def test_js_divergence_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    p[0, 3] = 0.0  # a zero probability counts zero
    p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    q, m = log_q.exp().numpy(), (p.numpy() + log_q.exp().numpy()) / 2
    pn = p.numpy()
    expected = 0.5 * np.where(pn > 0, pn * np.log(np.where(pn > 0, pn, 1) / m), 0).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
    np.testing.assert_allclose(js_divergence(p, log_q).numpy(), expected, rtol=1e-12)
    assert float(js_divergence(p, p.log()).abs().max()) < 1e-12


def _js_of_copy(model, reference, removed, batches) -> float:
    """Mean JS of a copy with ``removed`` (layer, part) sub-blocks dropped, from ``reference``'s distributions."""
    pruned = copy.deepcopy(model)
    for i, part in removed:
        nbl.linearize(pruned, {}, [i], mode="drop", part=part)
    total = count = 0
    with torch.no_grad():
        for b in batches:
            p = torch.softmax(reference(b).logits[:, :-1].double(), -1)
            log_q = torch.log_softmax(pruned(b).logits[:, :-1].double(), -1)
            total += float(js_divergence(p, log_q).sum())
            count += p.shape[0] * p.shape[1]
    return total / count


def test_finercut_removes_sub_blocks_in_the_order_brute_force_js_gives():
    model, heldout = make_tiny(num_layers=3, seed=2), token_batches(n_batches=2, seed=4)
    stats = {p: nbl.calibrate(model, token_batches(n_batches=2), progress=False, part=p) for p in ("attention", "mlp")}
    steps = greedy_joint_drop(model, stats, heldout, 4, progress=False)
    removed: list[tuple[int, str]] = []
    for _ in range(4):
        units = [(i, p) for p in ("attention", "mlp") for i in range(3) if (i, p) not in removed]
        js = {u: _js_of_copy(model, model, [*removed, u], heldout) for u in units}
        removed.append(min(js, key=js.get))
    assert [(s.layer, s.part) for s in steps] == removed
    assert steps[-1].total == pytest.approx(_js_of_copy(model, model, removed, heldout), rel=1e-4)
    assert nbl.replaced_layers(model) == {} and nbl.replaced_mlps(model) == {}  # the model as it was


# --- configs ---------------------------------------------------------------------------------------------------


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=["model=tiny-random-llama", "logger=disabled", *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        ["selection=shortgpt", "replacement=drop", "replacement.granularity=block"],
        ["selection=sleb", "replacement=drop", "replacement.granularity=block"],
        ["selection=replaceme", "replacement=replaceme"],
        ["selection=shortgpt", "replacement=linearpatch"],
        ["selection=finercut", "replacement=drop", "replacement.granularity=joint"],
    ],
)
def test_every_method_is_one_override(overrides):
    checked_config(_cfg(*overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["selection=shortgpt"], "selection=shortgpt chooses block units: add replacement.granularity=block"),
        (["selection=finercut", "replacement=drop"], "replacement.granularity=joint"),
        (["selection=cca", "replacement=replaceme", "replacement.granularity=attention"], "replaces replacement.granularity=block"),
        (["replacement=replaceme", "layers=[0,1]"], "layers may not hold 0"),
        (["replacement=linearpatch", "replacement.ridge=0.1"], "replacement.ridge=0.1: replacement.mode=linearpatch takes 0"),
        (["replacement=replaceme", "replacement.ridge=auto"], "replacement.ridge=auto: replacement.mode=replaceme takes a number"),
        (["selection=sleb", "replacement=drop", "replacement.granularity=block", "+selection.measure=kl"], "selection.measure=kl is read by"),
    ],
)
def test_misconfigured_methods_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        checked_config(_cfg(*overrides))


def _app(tmp_path: Path, *overrides: str) -> dict:
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nbl", "model=tiny-random-llama", "eval=none", "speed=none", "logger=disabled",
         f"hydra.run.dir={run}", *overrides], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "results.json").read_text())


def test_replaceme_from_the_app_writes_an_ordinary_checkpoint_and_says_how_it_is_served(tmp_path, nbl_cache):
    results = _app(tmp_path, "method=replaceme", "num_layers=2", "save_checkpoint=true")
    assert results["checkpoint_kind"] == "ordinary" and results["replacement_method"]["adds_parameters"] is False
    assert results["replaced_parts"] == {"block": [1, 2]} or results["replaced_parts"]["block"][0] >= 1
    fit = results["calibration"]["replaceme"]
    assert fit["folded_into"] == [results["replaced_parts"]["block"][0] - 1]
    config = json.loads((Path(results["checkpoint"]) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "llama"


def test_finercut_with_a_budget_stops_at_the_first_step_that_reaches_it(tmp_path, nbl_cache):
    # short held-out windows: each candidate's divergence is over 49,152-way next-token distributions
    results = _app(tmp_path, "method=finercut", "budget.target=prefill", "budget.value=1.2", "calibration.seq_len=256",
                   "selection.holdout_sequences=2")
    budget, steps = results["budget"], results["greedy_steps"]
    assert budget["predicted"] >= 1.2 and budget["units"] == len(steps) == results["num_layers"]
    assert results["predicted"]["prefill_speedup"] == pytest.approx(budget["predicted"])
