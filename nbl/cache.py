"""Content-keyed on-disk cache (calibration statistics, base-model evaluations), safe for concurrent jobs.

Entries heal themselves: a file that cannot be read, or whose stored key fields differ from the ones
asked for, is reported with its path, removed and recomputed. A failed write (a full disk) keeps the
value just computed for the running job and only warns.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from safetensors import safe_open

from nbl.calib.result import CalibrationResult

T = TypeVar("T")
log = logging.getLogger(__name__)

STATS_FORMAT = 2  # bump when the layout of a cache entry changes (part of every key)


class CacheEntryError(ValueError):
    """A cache file that exists but cannot be trusted (unreadable, or stored for other key fields)."""


def _canonical(fields: Mapping[str, object]) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


def cache_key(fields: Mapping[str, object]) -> str:
    """A stable hash of everything that changes the cached value."""
    blob = _canonical({"stats_format": STATS_FORMAT, **fields})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (flock on ``path``), released even on errors. A process that has to
    wait says so, naming the process that holds the lock (each holder writes who it is into the lock file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # jobs starting together: one computes, the others wait and reuse
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.warning("waiting for %s: %s holds it", path, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {platform.node()}, since {time.strftime('%H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(
    path: Path, lock: Path, load: Callable[[Path], T], compute: Callable[[], T], save: Callable[[T, Path], None]
) -> tuple[T, bool]:
    """Load ``path`` or compute, write atomically and return; under a lock so concurrent jobs compute once.

    A readable entry is read without the lock (entries are replaced atomically: a reader sees the old file or the
    whole new one), so a read-only cache still serves its hits; without a lock to take, a miss is computed and not
    stored.
    """
    if path.is_file():
        try:
            return load(path), True
        except Exception:  # damaged: the locked path below names it, removes it and recomputes
            pass
    try:
        with file_lock(lock):
            return _load_or_compute(path, load, compute, save)
    except PermissionError as err:  # a read-only cache folder: no lock file can be made
        log.warning("cache folder %s is not writable (%s); computing without the cache", path.parent, err)
        return compute(), False


def _load_or_compute(
    path: Path, load: Callable[[Path], T], compute: Callable[[], T], save: Callable[[T, Path], None]
) -> tuple[T, bool]:
    if path.is_file():
        try:
            return load(path), True
        except Exception as err:  # truncated, garbage, or stored for other fields: never trusted
            log.warning("cache entry %s is unusable (%s: %s); recomputing it", path, type(err).__name__, err)
            path.unlink(missing_ok=True)
    value = compute()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save(value, tmp)
        os.replace(tmp, path)  # atomic: readers never see a partial file
    except Exception as err:  # a full disk: OSError, or safetensors' own SafetensorError
        tmp.unlink(missing_ok=True)
        _unwritten(path, err)
    return value, False


def _unwritten(path: Path, err: Exception) -> None:
    """What was computed stays with the running job; only the cache misses it."""
    log.warning(
        "could not write cache entry %s (%s: %s); the result is kept for this run only", path, type(err).__name__, err
    )


def _dump(fields: Mapping[str, object]) -> str:
    return json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n"


def stats_entry(folder: Path, fields: Mapping[str, object]) -> Path:
    """Where the statistics for ``fields`` are (or would be) stored."""
    return folder / f"{cache_key(fields)}.safetensors"


def cached_calibration(
    folder: Path,
    fields: Mapping[str, object],
    compute: Callable[[], CalibrationResult],
    expect: Callable[[CalibrationResult], None] | None = None,
) -> tuple[CalibrationResult, bool, Path]:
    """Load the statistics for ``fields`` or compute and store them; returns (stats, hit, path).

    A stored entry is used only if its header holds the same fields, every layer matches its checksum, its sums
    pass :meth:`CalibrationResult.check` and ``expect`` (e.g. "one d x d accumulator per attention layer of this
    model") passes. Computed statistics come back read from the entry just written, lazily (one layer in memory
    at a time).
    """
    key = cache_key(fields)
    path = stats_entry(folder, fields)
    canonical = _canonical(fields)

    def load(p: Path) -> CalibrationResult:
        with safe_open(str(p), framework="pt") as f:
            stored = (f.metadata() or {}).get("fields")
        if stored != canonical:
            raise CacheEntryError("its header was written for other key fields")
        stats = CalibrationResult.load(p, lazy=True)  # one layer in memory at a time
        stats.check()
        if expect is not None:
            expect(stats)
        return stats

    def save(stats: CalibrationResult, tmp: Path) -> None:
        stats.save(tmp, metadata={"fields": canonical})
        atomic_write_text(folder / f"{key}.fields.json", _dump(fields))  # replaces a link, never writes through it

    stats, hit = _cached(path, folder / f"{key}.lock", load, compute, save)
    if not hit and path.is_file():  # read back lazily: the computed sums (on a GPU, say) can be freed
        try:
            stats = load(path)
        except Exception as err:  # keep what was computed: the entry heals on the next run
            log.warning("cache entry %s could not be read back (%s); using the computed statistics", path, err)
    return stats, hit, path


def cached_json(folder: Path, fields: Mapping[str, object], compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The same contract for small JSON results (the base model's evaluation shared by a sweep)."""
    key = cache_key(fields)
    canonical = _canonical(fields)

    def load(p: Path) -> dict:
        data = json.loads(p.read_text())
        if _canonical(data.get("fields", {})) != canonical or "value" not in data:
            raise CacheEntryError("it was written for other key fields")
        return data["value"]

    return _cached(
        folder / f"{key}.json",
        folder / f"{key}.lock",
        load,
        compute,
        lambda value, tmp: tmp.write_text(_dump({"fields": fields, "value": value})),
    )


def grown_steps(folder: Path, fields: Mapping[str, object], grow: Callable[[list[dict]], list[dict]]) -> list[dict]:
    """Steps of a greedy procedure whose first steps do not depend on how many are asked for (greedy layers,
    plan steps), cached as one entry per ``fields`` that only grows.

    ``grow(earlier)`` gets the cached steps (``[]`` if none or unreadable) and returns this run's steps: a
    prefix of them, or them continued. The entry is rewritten, under a lock, only when the new list is longer
    than what the file holds then, so concurrent jobs can only add steps.
    """
    path = folder / f"{cache_key(fields)}.json"
    canonical = _canonical(fields)

    def read() -> list[dict]:
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
            if _canonical(data["fields"]) != canonical:
                raise CacheEntryError("it was written for other key fields")
            return list(data["steps"])
        except (ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cache entry %s (%s)", path, err)
            return []

    steps = grow(read())
    try:
        with file_lock(folder / f"{cache_key(fields)}.lock"):
            if len(steps) > len(read()):
                atomic_write_text(path, _dump({"fields": fields, "steps": steps}))
    except OSError as err:  # a full disk, a read-only cache: the steps were measured and are kept
        _unwritten(path, err)
    return steps
