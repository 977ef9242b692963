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
from typing import Any, TypedDict

from nbl.core.adapters import ADAPTERS
from nbl.core.causal_lm import family_model_type
from nbl.core.checkpoint import CheckpointError, declared_replacement, serving_architecture, weight_files

MODES = {"attention": ("linear", "drop", "conv"), "mlp": ("linear", "drop")}
# the families whose NBL checkpoints vLLM serves (nbl.serve.vllm_model builds each); the others run in transformers
SERVED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "mixtral", "qwen3_moe", "olmoe",
                   "gemma2", "gemma3_text")
SERVED_VERSIONS = (2, 3)  # format 3 declares model_type nbl_<family>: its config class is registered below


class ServedPlan(TypedDict):
    """What a checkpoint's layers become when served: replaced ``attention`` and ``mlp`` (layer -> mode), the
    ``conv`` maps' (width, rank), and their one width (``conv_width``; None without conv maps)."""

    attention: dict[int, str]
    mlp: dict[int, str]
    conv: dict[int, tuple[int, int | None]]
    conv_width: int | None


def register() -> None:
    """Register ``Nbl<Family>ForCausalLM`` and ``NblConv<Family>ForCausalLM`` for every served family
    (``SERVED_FAMILIES``; lazily: the model code is imported only when vLLM builds such a model). Safe to call more
    than once."""
    from vllm import ModelRegistry

    from nbl.core.causal_lm import register_auto_classes

    register_auto_classes(models=False)  # vLLM reads a checkpoint's config through transformers' AutoConfig
    _register_served_configs()
    known = set(ModelRegistry.get_supported_archs())
    for model_type in SERVED_FAMILIES:
        for conv in (False, True):
            name = serving_architecture(model_type, conv=conv)
            if name not in known:
                ModelRegistry.register_model(name, f"nbl.serve.vllm_model:{name}")


def mark_conv_layers(config: Any) -> None:
    """Type a convolution map's layer ``"conv"`` in ``config.layer_types`` (families that declare layer types: Qwen2,
    Qwen3), as vLLM reads the config: vLLM decides that a model is hybrid (state layers beside attention) from its
    class and from ``layer_types``, which would say every layer is attention. With no sliding layer, vLLM's check
    that sliding windows cover all layers (``max_window_layers``) is met as it was."""
    meta, types = getattr(config, "nbl", None), getattr(config, "layer_types", None)
    conv = meta.get("conv_maps") if isinstance(meta, dict) else None
    if not conv or not types:
        return
    config.layer_types = ["conv" if str(i) in conv else t for i, t in enumerate(types)]
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and all(t in rope for t in types):  # one rotary table per layer type (Gemma 3)
        rope["conv"] = rope[types[int(next(iter(conv)))]]  # never read: a conv layer has no attention
    if "sliding_attention" not in types and hasattr(config, "max_window_layers"):
        config.max_window_layers = config.num_hidden_layers


_SERVED_CONFIGS: dict[str, type] = {}  # model_type -> the config class vLLM reads it as


def served_config_class(model_type: str) -> type:
    """The NBL config class of a family (its ``model_type``) as vLLM reads it: :func:`mark_conv_layers` applied
    after the family's ``__init__``. Found by name in this module (``Served<NblConfig>``): vLLM pickles configs to
    its worker processes."""
    if model_type not in _SERVED_CONFIGS:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from nbl.core.causal_lm import nbl_config_class

        base = nbl_config_class(CONFIG_MAPPING[model_type])

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, **kwargs)
            mark_conv_layers(self)

        name = f"Served{base.__name__}"
        _SERVED_CONFIGS[model_type] = type(name, (base,), {"__init__": __init__, "__module__": __name__,
                                                           "__qualname__": name})  # fmt: skip
    return _SERVED_CONFIGS[model_type]


def _register_served_configs() -> None:
    """vLLM reads NBL checkpoints' configs as :func:`served_config_class` makes them (vLLM's registry of config
    classes, which it consults before transformers' AutoConfig)."""
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    for model_type in SERVED_FAMILIES:
        served = served_config_class(model_type)
        _CONFIG_REGISTRY.setdefault(served.model_type, served)


def __getattr__(name: str) -> type:
    """``Served<NblConfig>`` by name (unpickling in vLLM's workers)."""
    for model_type in SERVED_FAMILIES:
        if served_config_class(model_type).__name__ == name:
            return served_config_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_checkpoint(config: Any, folder: str | Path | None = None) -> ServedPlan:
    """The replacement a checkpoint's config declares, checked (:class:`ServedPlan`).

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
    family = family_model_type(config.model_type)
    if family not in SERVED_FAMILIES:
        known = [t for a in ADAPTERS for t in a.model_types]
        runs = " (NBL replaces its layers in transformers: nbl.load_linearized serves it there)" if family in known else ""
        raise CheckpointError(f"model_type {config.model_type!r}: the plugin serves {', '.join(SERVED_FAMILIES)}{runs}")
    if meta.get("model_type") != family:
        raise CheckpointError(
            f"the replacement was made on a {meta.get('model_type')!r} model, but the config is of model_type "
            f"{config.model_type!r}: the files come from different models"
        )
    n = config.num_hidden_layers
    declared = declared_replacement(meta)
    plan: ServedPlan = {"attention": declared["attention"], "mlp": declared["mlp"], "conv": declared["conv"],
                        "conv_width": None}  # fmt: skip
    for part in ("attention", "mlp"):
        bad = {i: m for i, m in plan[part].items() if not 0 <= i < n or m not in MODES[part]}
        if bad:
            raise CheckpointError(f"replaced {part} {bad}: layers are 0..{n - 1}, modes {MODES[part]}")
    plan["conv_width"] = _conv_width(plan, config)
    if folder is not None and Path(folder).is_dir():
        _check_weights(Path(folder), plan, n)
    return plan


def _conv_width(plan: ServedPlan, config: Any) -> int | None:
    """The convolution maps' one width, checked against the architecture the config declares (vLLM builds a
    hybrid model, which holds their state, only from the ``NblConv`` class)."""
    conv = sorted(i for i, m in plan["attention"].items() if m == "conv")
    if sorted(plan["conv"]) != conv:
        raise CheckpointError(f"layers {conv} are declared conv but 'nbl.conv_maps' describes {sorted(plan['conv'])}")
    expected = serving_architecture(family_model_type(config.model_type), conv=bool(conv))
    if getattr(config, "architectures", None) not in (None, [expected]):
        raise CheckpointError(
            f"the config declares {config.architectures}, but a checkpoint with{'' if conv else 'out'} convolution "
            f"maps is served as {expected}: save it again with nbl.save_linearized"
        )
    widths = {w for w, _ in plan["conv"].values()}
    if len(widths) > 1:
        raise CheckpointError(
            f"convolution maps of widths {sorted(widths)}: vLLM gives every state layer of a model one state shape, "
            "so a served checkpoint's maps must share one width"
        )
    return widths.pop() if widths else None


def _check_weights(folder: Path, plan: ServedPlan, n: int) -> None:
    """Every layer's weights as its replacement leaves them: a map's W and b where linear, no attention or MLP
    weights where replaced, the original ones where kept."""
    names = set(weight_files(folder))
    problems = [] if "model.embed_tokens.weight" in names else ["model.embed_tokens.weight missing (a tied head?)"]
    for i in range(n):
        prefix = f"model.layers.{i}."
        attention, mlp = plan["attention"].get(i), plan["mlp"].get(i)
        factors = attention == "conv" and plan["conv"][i][1] is not None
        expected = {
            "attn_linear.weight": attention == "linear" or (attention == "conv" and not factors),
            "attn_linear.down": factors,
            "self_attn.o_proj.weight": attention is None,
            "mlp.linear.weight": mlp == "linear",
        }
        for name, present in expected.items():
            if (prefix + name in names) != present:
                problems.append(f"{prefix}{name} {'missing' if present else 'present'}")
        # the MLP's own weights (a dense MLP's projections, or a router and its experts) where it is kept
        own = any(n.startswith(f"{prefix}mlp.") and not n.startswith(f"{prefix}mlp.linear.") for n in names)
        if own != (mlp is None):
            problems.append(f"{prefix}mlp's own weights {'missing' if mlp is None else 'present'}")
    if problems:
        raise CheckpointError(f"the weights do not match the declared replacement: {', '.join(problems[:6])}")
