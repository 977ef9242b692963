"""Self-contained checkpoints of linearized models: config.json, sharded safetensors, generation_config.json, the
tokenizer, and a small nbl.json.

Format 3: config.json declares ``model_type: nbl_<family>`` and the replacement (``nbl``), and the architecture
``Nbl<Family>ForCausalLM`` that both the vLLM plugin (:mod:`nbl.serve.vllm_plugin`) and transformers (after
:func:`nbl.core.causal_lm.register_auto_classes`) build; transformers alone refuses the unknown model type instead
of loading the replaced layers' attention with random weights. The weights are written in shards of at most
``max_shard_size`` with transformers' index file, holding one shard in host memory at a time (also for dispatched
and offloaded models), and load through transformers' ``from_pretrained``, shard by shard onto the target device
or ``device_map``. Formats 1 (nbl.json alone) and 2 (``model_type`` of the family) still load. Reloading needs no
remote code, no pickle and no file outside the folder.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.hub import convert_file_size_to_int

from nbl.core.adapters import adapter_for_config
from nbl.core.causal_lm import (
    family_class,
    family_model_type,
    nbl_class,
    nbl_config_class,
    recast,
    register_auto_classes,
)
from nbl.core.surgery import apply_replacements, conv_shapes, replaced_layers, replaced_mlps
from nbl.models import safetensors_names

NBL_FILE = "nbl.json"
WEIGHTS_FILE = "model.safetensors"  # one shard; more: model-0000i-of-0000n.safetensors and the index below
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: nbl.json alone; 2: config.json with the family's model_type
DEFAULT_SHARD_SIZE = "4GB"


class CheckpointError(ValueError):
    """A folder that is not a readable NBL checkpoint, named with the file at fault; raised before any weight loads."""


def serving_architecture(model_type: str, conv: bool = False) -> str:
    """The architecture name an NBL checkpoint of this family declares: ``Nbl<Family>ForCausalLM``, or with
    convolution maps ``NblConv<Family>ForCausalLM`` (vLLM serves those as hybrid models: the maps' state lives in its
    cache manager, and whether a model is hybrid is a property of its class)."""
    return f"Nbl{'Conv' if conv else ''}{family_class(model_type).__name__}"


def declared_replacement(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``nbl`` entry as ``{"attention": {layer: mode}, "mlp": {...}, "conv": {layer: (T, rank)}}``,
    its layer keys checked (a :class:`CheckpointError` names the entry at fault)."""

    def layers(key: str) -> dict[int, Any]:
        entry = meta.get(key, {})
        if not isinstance(entry, dict):
            raise CheckpointError(f"'nbl.{key}' must map layer indices to modes, got {entry!r}")
        bad = [k for k in entry if not str(k).isdigit()]
        if bad:
            raise CheckpointError(f"'nbl.{key}' has layer keys {bad} that are not layer indices")
        return {int(k): v for k, v in entry.items()}

    conv = {i: (int(m["width"]), m.get("rank")) for i, m in layers("conv_maps").items()}
    return {"attention": layers("replaced_layers"), "mlp": layers("replaced_mlps"), "conv": conv}


def apply_declared(model: PreTrainedModel, meta: Mapping[str, Any]) -> None:
    """Make the replacement a checkpoint's ``nbl`` entry declares, with fresh maps (the weights fill them)."""
    plan = declared_replacement(meta)
    apply_replacements(model, plan["attention"], conv=plan["conv"])
    apply_replacements(model, plan["mlp"], part="mlp")


def _meta(model: PreTrainedModel) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "replaced_layers": {str(i): mode for i, mode in sorted(replaced_layers(model).items())},  # attention
        "replaced_mlps": {str(i): mode for i, mode in sorted(replaced_mlps(model).items())},  # a block: "drop" here
    }
    conv = conv_shapes(model)
    if conv:  # conv maps (attention): their width and rank
        meta["conv_maps"] = {str(i): {"width": w, "rank": r} for i, (w, r) in sorted(conv.items())}
    return meta


def save_linearized(
    model: PreTrainedModel,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write the (possibly) linearized ``model`` to the folder ``path``: config, weights in shards of at most
    ``max_shard_size`` (bytes, or "500MB", "4GB"; default 4 GB), its generation config, ``tokenizer`` with its chat
    template when given. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _meta(model)
    config = copy.deepcopy(model.config)  # the model's own config stays as it is
    recast(config, nbl_config_class(type(model.config)))  # model_type nbl_<family>
    config.architectures = [serving_architecture(meta["model_type"], conv="conv_maps" in meta)]
    config.nbl = meta
    config.save_pretrained(folder)
    write_weights(model, folder, convert_file_size_to_int(max_shard_size or DEFAULT_SHARD_SIZE))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)  # sampling defaults, special tokens: what engines read
    (folder / NBL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _stored(model: PreTrainedModel) -> Iterator[tuple[str, nn.Module, str, int]]:
    """(name, module, attribute, bytes) of every tensor a checkpoint stores, in state-dict order, read from the
    modules' metadata (an offloaded weight on the meta device has its shape and dtype there)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for prefix, module in model.named_modules():
        persistent = {n: b for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set}
        for attr, tensor in {**{n: p for n, p in module._parameters.items() if p is not None}, **persistent}.items():
            name = f"{prefix}.{attr}" if prefix else attr
            if tied and name == "lm_head.weight":  # stored once, as the embedding (what engines read)
                continue
            yield name, module, attr, tensor.numel() * tensor.element_size()


def _on_host(module: nn.Module, attrs: list[str]) -> dict[str, torch.Tensor]:
    """``module``'s tensors ``attrs`` on the CPU: read from accelerate's offload store when they are offloaded."""
    from accelerate.utils import has_offloaded_params
    from accelerate.utils.modeling import align_module_device

    with align_module_device(module, torch.device("cpu")) if has_offloaded_params(module) else nullcontext():
        return {attr: getattr(module, attr).detach().to("cpu").contiguous() for attr in attrs}


def write_weights(model: PreTrainedModel, folder: Path, max_shard_size: int,
                  rename: Callable[[str], str | None] | None = None) -> list[Path]:  # fmt: skip
    """The model's tensors as safetensors shards of at most ``max_shard_size`` bytes (a tensor larger than that
    alone in its shard), with transformers' index when there are several; one shard in host memory at a time.
    ``rename``: each tensor's name in the file (None: not stored)."""
    shards: list[list[tuple[str, nn.Module, str, int]]] = [[]]
    size = 0  # of the last shard
    for entry in _stored(model):
        if rename is not None:
            name = rename(entry[0])
            if name is None:
                continue
            entry = (name, *entry[1:])
        if shards[-1] and size + entry[3] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:  # an earlier save's shards
        stale.unlink(missing_ok=True)
    n = len(shards)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, file in zip(shards, names, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        by_module: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
        for name, module, attr, _ in shard:
            by_module.setdefault(id(module), (module, []))[1].append((name, attr))
        for module, entries in by_module.values():
            on_host = _on_host(module, [attr for _, attr in entries])
            tensors.update({name: on_host[attr] for name, attr in entries})
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(e[3] for s in shards for e in s)},
            "weight_map": {e[0]: file for s, file in zip(shards, names, strict=True) for e in s},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / file for file in names]


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``nbl`` entry of a checkpoint folder's config, checked against the config; a :class:`CheckpointError`
    names the file at fault."""
    config_file, meta_file = folder / "config.json", folder / NBL_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: {folder} is not an NBL checkpoint")
    fields = _json(config_file)
    meta = fields.get("nbl")
    if meta is None:  # format 1: nbl.json alone
        if not meta_file.is_file():
            raise CheckpointError(f"{folder} is not an NBL checkpoint: {config_file} declares no 'nbl' and {meta_file} is missing")
        meta = _json(meta_file)
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{config_file}: NBL checkpoint format {version!r}; this nbl reads {READABLE_VERSIONS}")
    family = family_model_type(str(fields.get("model_type")))
    if meta.get("model_type") != family:
        raise CheckpointError(
            f"{config_file}: the replacement was made on a {meta.get('model_type')!r} model, but the config is of "
            f"model_type {fields.get('model_type')!r} (family {family!r}): the files come from different models"
        )
    adapter_for_config(SimpleNamespace(model_type=family, architectures=fields.get("architectures")))
    try:
        declared_replacement(meta)
    except CheckpointError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    return meta


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it (the index's files when there is an index),
    every file's header read and checked against the file's size: a missing, truncated or damaged file is a
    :class:`CheckpointError` that names it."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted({folder / name for name in _json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no safetensors weights")
    names: dict[str, Path] = {}
    for file in files:
        for name in _header(file):
            if name in names:
                raise CheckpointError(f"{name} is stored twice: in {names[name]} and in {file}")
            names[name] = file
    return names


def _header(file: Path) -> list[str]:
    """The tensor names of a safetensors file, its header checked against the file's size."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return safetensors_names(file)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}): the checkpoint is damaged") from None


def load_linearized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> PreTrainedModel:
    """Rebuild a model written by :func:`save_linearized`: its family's NBL class, the declared replacement, every
    weight loaded strictly (a missing, unexpected or mis-shaped tensor is a :class:`CheckpointError`), shard by shard
    onto ``device`` (or accelerate's ``device_map``, with ``offload_folder`` for its "disk" entries), in ``dtype``
    (default: the checkpoint's)."""
    folder = Path(path)
    meta = read_meta(folder)
    weight_files(folder)  # every file whole, before the load starts
    register_auto_classes()
    config = AutoConfig.from_pretrained(folder)
    if meta.get("format_version", 0) < 3:  # the family's model_type: build the NBL class from it explicitly
        config.nbl = meta
    cls = nbl_class(family_class(config.model_type))
    offload = {"offload_folder": str(offload_folder)} if offload_folder is not None else {}
    model, info = cls.from_pretrained(
        folder, config=config, dtype=dtype or "auto", device_map=device_map or device, output_loading_info=True, **offload
    )
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    problems = {k: sorted(set(v) - tied) if k == "missing_keys" else v for k, v in info.items() if v}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match the model its config declares: {problems}")
    return model.eval()

