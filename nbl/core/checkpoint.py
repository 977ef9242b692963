"""Self-contained checkpoints of linearized models: HF config + safetensors + a small nbl.json.

Reloading needs no remote code, no pickle and no file outside the folder. Format 2: config.json also declares
the replacement (``nbl``) and the serving architecture ``Nbl<Family>ForCausalLM``, which the vLLM plugin
(:mod:`nbl.serve.vllm_plugin`) registers; transformers still builds the model from ``model_type``.
"""

from __future__ import annotations

import copy
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_model, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from nbl.core.adapters import adapter_for_config
from nbl.core.surgery import apply_replacements, conv_shapes, replaced_layers, replaced_mlps

NBL_FILE = "nbl.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: nbl.json alone (no serving architecture in config.json)


def serving_architecture(model_type: str) -> str:
    """The architecture name an NBL checkpoint of this family declares for serving engines."""
    return f"Nbl{adapter_for_config(SimpleNamespace(model_type=model_type)).causal_lm}"


def save_linearized(model: PreTrainedModel, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write the (possibly) linearized ``model`` to the folder ``path``; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "replaced_layers": {str(i): mode for i, mode in sorted(replaced_layers(model).items())},  # attention
        "replaced_mlps": {str(i): mode for i, mode in sorted(replaced_mlps(model).items())},  # a block: "drop" here
    }
    conv = conv_shapes(model)
    if conv:  # conv maps (attention): their width and rank
        meta["conv_maps"] = {str(i): {"width": w, "rank": r} for i, (w, r) in sorted(conv.items())}
    config = copy.deepcopy(model.config)  # the model's own config stays as it is
    config.architectures, config.nbl = [serving_architecture(config.model_type)], meta
    config.save_pretrained(folder)
    if any(hasattr(m, "_hf_hook") for m in model.modules()):  # dispatched: offloaded weights live off the module
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        state = get_state_dict_offloaded_model(model)
    else:
        state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):  # stored once, as the embedding (what engines read)
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / NBL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_linearized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Rebuild a model written by :func:`save_linearized` (standard classes, strict weight load)."""
    folder = Path(path)
    meta_file = folder / NBL_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {folder} is not an NBL checkpoint")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"unsupported NBL checkpoint version {meta.get('format_version')}")
    config = AutoConfig.from_pretrained(folder)
    adapter_for_config(config)  # clear error for an unsupported family
    with _weights_not_initialised():  # every weight is loaded below (strictly): initialising them is wasted time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype or torch.float32)
    model.tie_weights()  # skipping initialisation skips the tying too: a tied head is stored once, as one tensor
    conv = {int(i): (int(m["width"]), m["rank"]) for i, m in meta.get("conv_maps", {}).items()}
    apply_replacements(model, {int(i): mode for i, mode in meta["replaced_layers"].items()}, conv=conv)
    apply_replacements(model, {int(i): mode for i, mode in meta.get("replaced_mlps", {}).items()}, part="mlp")
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device).eval()


def _weights_not_initialised() -> AbstractContextManager:
    """transformers' switch that skips random weight initialisation (minutes for an 8B model on a CPU); a plain
    context where this transformers has none."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return nullcontext()
    return no_init_weights()
