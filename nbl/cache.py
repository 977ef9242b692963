"""Content-keyed on-disk cache of calibration statistics, safe for concurrent sweep jobs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from nbl.calibration import CalibrationResult

T = TypeVar("T")

STATS_FORMAT = 1  # bump when what calibration computes changes (part of every key)


def cache_key(fields: Mapping[str, object]) -> str:
    """A stable hash of everything that changes the statistics."""
    blob = json.dumps({"stats_format": STATS_FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # jobs starting together: one computes, the others wait and reuse
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(
    path: Path, lock: Path, load: Callable[[Path], T], compute: Callable[[], T], save: Callable[[T, Path], None]
) -> tuple[T, bool]:
    """Load ``path`` or compute, write atomically and return; under a lock so concurrent jobs compute once."""
    with _locked(lock):
        if path.is_file():
            return load(path), True
        value = compute()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save(value, tmp)
        os.replace(tmp, path)  # atomic: readers never see a partial file
    return value, False


def _dump(fields: Mapping[str, object]) -> str:
    return json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n"


def cached_calibration(
    folder: Path, fields: Mapping[str, object], compute: Callable[[], CalibrationResult]
) -> tuple[CalibrationResult, bool, Path]:
    """Load the statistics for ``fields`` or compute and store them; returns (stats, hit, path)."""
    key = cache_key(fields)
    path = folder / f"{key}.safetensors"

    def save(stats: CalibrationResult, tmp: Path) -> None:
        stats.save(tmp, metadata={"fields": json.dumps(fields, sort_keys=True, default=str)})
        (folder / f"{key}.fields.json").write_text(_dump(fields))

    stats, hit = _cached(path, folder / f"{key}.lock", CalibrationResult.load, compute, save)
    return stats, hit, path


def cached_json(folder: Path, fields: Mapping[str, object], compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The same contract for small JSON results (the base model's evaluation shared by a sweep)."""
    key = cache_key(fields)
    return _cached(
        folder / f"{key}.json",
        folder / f"{key}.lock",
        lambda p: json.loads(p.read_text())["value"],
        compute,
        lambda value, tmp: tmp.write_text(_dump({"fields": fields, "value": value})),
    )
