"""The vLLM plugin: serving NBL checkpoints in vLLM (``vllm serve <checkpoint>``, ``vllm.LLM(<checkpoint>)``).

Installed with the ``serve`` extra (``serve-cpu`` on machines without a GPU), vLLM finds :func:`register` through
the ``vllm.general_plugins`` entry point in every process it starts. It registers one architecture per family,
``Nbl<Family>ForCausalLM``, which an NBL checkpoint's config.json declares (format 2); ordinary checkpoints keep
their own architecture names, so vLLM serves them as before.

:func:`check_checkpoint` is what the model classes check when vLLM builds them, before it loads a weight or
allocates a byte of KV cache; it imports nothing from vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbl.core.adapters import ADAPTERS
from nbl.core.causal_lm import family_model_type
from nbl.core.checkpoint import CheckpointError, declared_replacement, serving_architecture, weight_files

MODES = ("linear", "drop")
SERVED_VERSIONS = (2, 3)  # format 3 declares model_type nbl_<family>: its config class is registered below


def register() -> None:
    """Register ``Nbl<Family>ForCausalLM`` for every supported family (lazily: the model code is imported only when
    vLLM builds such a model). Safe to call more than once."""
    from vllm import ModelRegistry

    from nbl.core.causal_lm import register_auto_classes

    register_auto_classes(models=False)  # vLLM reads a checkpoint's config through transformers' AutoConfig
    known = set(ModelRegistry.get_supported_archs())
    for adapter in ADAPTERS:
        for model_type in adapter.model_types:
            name = serving_architecture(model_type)
            if name not in known:
                ModelRegistry.register_model(name, f"nbl.serve.vllm_model:{name}")


def check_checkpoint(config: Any, folder: str | Path | None = None) -> dict[str, dict[int, str]]:
    """The replacement a checkpoint's config declares, checked: ``{"attention": {layer: mode}, "mlp": {...}}``.

    ``config``: the checkpoint's config (its ``nbl`` entry, written by :func:`nbl.save_linearized`). ``folder``:
    where its weights are, when local: their names must be exactly what that replacement leaves.
    """
    meta = getattr(config, "nbl", None)
    if not isinstance(meta, dict):
        raise CheckpointError(
            "this config declares no NBL replacement (no 'nbl' entry): it is not a checkpoint written by "
            "nbl.save_linearized (format 2 or later); a format-1 checkpoint must be saved again: "
            "nbl.save_linearized(nbl.load_linearized(old), new)"
        )
    if meta.get("format_version") not in SERVED_VERSIONS:
        raise CheckpointError(f"NBL checkpoint format {meta.get('format_version')}: this plugin serves {SERVED_VERSIONS}")
    supported = [t for a in ADAPTERS for t in a.model_types]
    family = family_model_type(config.model_type)
    if family not in supported:
        raise CheckpointError(f"model_type {config.model_type!r}: the plugin serves {', '.join(supported)}")
    if meta.get("model_type") != family:
        raise CheckpointError(
            f"the replacement was made on a {meta.get('model_type')!r} model, but the config is of model_type "
            f"{config.model_type!r}: the files come from different models"
        )
    n = config.num_hidden_layers
    declared = declared_replacement(meta)
    plan = {part: declared[part] for part in ("attention", "mlp")}
    conv = sorted(i for i, m in plan["attention"].items() if m == "conv")
    if conv:
        raise CheckpointError(
            f"layers {conv} replace attention by convolution maps (replacement.mode=conv), whose decode state (the "
            "last T - 1 hidden vectors of each sequence) vLLM's model runner has no place for: serve a checkpoint "
            "made with replacement.mode=linear, or run this one with nbl.load_linearized in transformers"
        )
    for part, modes in plan.items():
        bad = {i: m for i, m in modes.items() if not 0 <= i < n or m not in MODES}
        if bad:
            raise CheckpointError(f"replaced {part} {bad}: layers are 0..{n - 1}, modes {MODES}")
    if folder is not None and Path(folder).is_dir():
        _check_weights(Path(folder), plan, n)
    return plan


def _check_weights(folder: Path, plan: dict[str, dict[int, str]], n: int) -> None:
    """Every layer's weights as its replacement leaves them: a map's W and b where linear, no attention or MLP
    weights where replaced, the original ones where kept."""
    names = set(weight_files(folder))
    problems = [] if "model.embed_tokens.weight" in names else ["model.embed_tokens.weight missing (a tied head?)"]
    for i in range(n):
        prefix = f"model.layers.{i}."
        attention, mlp = plan["attention"].get(i), plan["mlp"].get(i)
        expected = {
            "attn_linear.weight": attention == "linear",
            "self_attn.o_proj.weight": attention is None,
            "mlp.linear.weight": mlp == "linear",
            "mlp.down_proj.weight": mlp is None,
        }
        for name, present in expected.items():
            if (prefix + name in names) != present:
                problems.append(f"{prefix}{name} {'missing' if present else 'present'}")
    if problems:
        raise CheckpointError(f"the weights do not match the declared replacement: {', '.join(problems[:6])}")
