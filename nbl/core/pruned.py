"""Ordinary checkpoints of models whose replaced units are whole blocks removed: the family's own config and
weights with fewer decoder layers (``num_hidden_layers`` lowered, the layers renumbered), which transformers, vLLM
and any other engine load without nbl. What a folded replacement (ReplaceMe) leaves is such a model: its transforms
live in existing weights."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils.hub import convert_file_size_to_int

from nbl.core.adapters import get_adapter
from nbl.core.checkpoint import DEFAULT_SHARD_SIZE, write_weights
from nbl.core.surgery import replaced_layers, replaced_mlps

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PRUNED_FILE = "nbl_pruned.json"  # provenance: which blocks of which depth were removed (no loader reads it)


def removed_blocks(model: PreTrainedModel) -> list[int]:
    """The layers removed whole (attention and MLP dropped); ValueError if any other replacement is in the model,
    which an ordinary checkpoint cannot hold."""
    attention, mlps = replaced_layers(model), replaced_mlps(model)
    blocks = sorted(i for i, mode in attention.items() if mode == "drop" and mlps.get(i) == "drop")
    other = sorted((set(attention) | set(mlps)) - set(blocks))
    if other:
        raise ValueError(f"layers {other} hold replaced sub-blocks other than whole-block drops: an ordinary "
                         "checkpoint cannot hold them (save_linearized writes an NBL checkpoint)")  # fmt: skip
    return blocks


def _renamer(model: PreTrainedModel, removed: list[int]) -> Callable[[str], str | None]:
    layers = get_adapter(model).layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    kept = [i for i in range(len(layers)) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix) :].partition(".")
        old = int(index)
        return None if old not in new_index else f"{prefix}{new_index[old]}.{rest}"

    return rename


def save_pruned(
    model: PreTrainedModel,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str | None = None,
    replacement: str | None = None,
) -> Path:
    """Write ``model`` without its removed blocks as the family's own checkpoint (config, safetensors shards of at
    most ``max_shard_size``, generation config, tokenizer) and a provenance file; returns the folder."""
    removed = removed_blocks(model)
    adapter, folder = get_adapter(model), Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(adapter.layers(model))
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n - len(removed)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds follow their layers
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in removed]
    config.architectures = [adapter.causal_lm]
    config.save_pretrained(folder)
    write_weights(model, folder, convert_file_size_to_int(max_shard_size or DEFAULT_SHARD_SIZE), _renamer(model, removed))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    provenance = {"removed_blocks": removed, "original_num_hidden_layers": n, "replacement": replacement}
    (folder / PRUNED_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return folder
