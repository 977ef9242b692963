"""The calibration cache: keyed by content, atomic, one computation when jobs start together."""

import errno
import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nbl.cache import atomic_write_text, cache_key, cached_calibration, cached_json, grown_steps
from nbl.calib.result import CalibrationResult
from nbl.core.stats import CovarianceAccumulator


def _stats() -> CalibrationResult:
    acc = CovarianceAccumulator(3, 3)
    g = torch.Generator().manual_seed(0)
    acc.update(torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g))
    return CalibrationResult({0: acc}, {0: 7.5})


def _job(folder: str, counter: str, out: "mp.Queue") -> None:
    def compute() -> CalibrationResult:
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.5)  # long enough for the other jobs to arrive while this one computes
        return _stats()

    stats, hit, _ = cached_calibration(Path(folder), {"model": "m", "tokens": 10}, compute)
    out.put((hit, stats.cosine_sums[0], float(stats[0].sum_xx.sum())))


def test_concurrent_jobs_compute_once(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    counter = tmp_path / "computed"
    procs = [ctx.Process(target=_job, args=(str(tmp_path / "stats"), str(counter), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [queue.get(timeout=5) for _ in procs]
    assert counter.read_text() == "x"
    assert sorted(hit for hit, *_ in results) == [False, True, True]
    assert len({r[1:] for r in results}) == 1
    assert not list((tmp_path / "stats").glob("*.tmp*"))


def test_key_changes_with_any_field():
    base = {"model": {"path": "a", "dtype": "float32"}, "calibration": {"seq_len": 512, "seed": 0}}
    assert cache_key(base) == cache_key(
        {"calibration": {"seed": 0, "seq_len": 512}, "model": {"dtype": "float32", "path": "a"}}
    )
    assert cache_key(base) != cache_key({**base, "calibration": {"seq_len": 512, "seed": 1}})
    assert cache_key(base) != cache_key({**base, "model": {"path": "a", "dtype": "bfloat16"}})


def test_cached_json_round_trip(tmp_path):
    calls = []
    value, hit = cached_json(tmp_path, {"k": 1}, lambda: calls.append(1) or {"acc": 0.5})
    again, hit_again = cached_json(tmp_path, {"k": 1}, lambda: calls.append(1) or {"acc": 0.0})
    assert (value, hit, again, hit_again, len(calls)) == ({"acc": 0.5}, False, {"acc": 0.5}, True, 1)


def _counting(calls: list):
    def compute() -> CalibrationResult:
        calls.append(1)
        return _stats()

    return compute


def _zero_a_row(path: Path) -> None:
    """Zero row 0 of layer 0's sum_xx and write the file again with its header (fields, checksums) intact."""
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["layer0.sum_xx"][0] = 0.0
    save_file(tensors, str(path), metadata=header)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x40  # inside the last tensor's bytes: a finite value, silently different
    path.write_bytes(bytes(data))


def _strip_checksums(path: Path) -> None:
    """As an entry written before checksums existed."""
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del header["nbl_checksums"]
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:100]),
        lambda p: p.write_bytes(b"not a safetensors file"),
        _zero_a_row,
        _flip_a_byte,
        _strip_checksums,
    ],
    ids=["truncated", "garbage", "zeroed-row", "flipped-byte", "no-checksums"],
)
def test_damaged_statistics_are_named_and_recomputed(tmp_path, caplog, damage):
    calls: list = []
    _, _, path = cached_calibration(tmp_path, {"k": 1}, _counting(calls))
    damage(path)
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        stats, hit, again = cached_calibration(tmp_path, {"k": 1}, _counting(calls))
    assert (hit, len(calls), again) == (False, 2, path)
    assert str(path) in caplog.text and "recomputing" in caplog.text
    torch.testing.assert_close(stats[0].sum_xx, _stats()[0].sum_xx)
    assert cached_calibration(tmp_path, {"k": 1}, _counting(calls))[1]  # healed: a hit again


def test_statistics_stored_for_other_fields_are_not_trusted(tmp_path):
    calls: list = []
    _, _, path = cached_calibration(tmp_path, {"k": 1}, _counting(calls))
    other = tmp_path / "other"
    other.mkdir()
    _, _, foreign = cached_calibration(other, {"k": 2}, _counting(calls))
    path.write_bytes(foreign.read_bytes())  # a valid file whose header names other fields
    assert not cached_calibration(tmp_path, {"k": 1}, _counting(calls))[1] and len(calls) == 3


def test_statistics_failing_the_callers_check_are_recomputed(tmp_path):
    calls: list = []
    cached_calibration(tmp_path, {"k": 1}, _counting(calls))

    def expect(stats: CalibrationResult) -> None:
        raise ValueError("holds layers [0], the model has attention layers [0, 1]")

    assert not cached_calibration(tmp_path, {"k": 1}, _counting(calls), expect=expect)[1]
    assert len(calls) == 2


def test_statistics_that_cannot_be_sums_of_products_are_recomputed(tmp_path, caplog):
    """A valid checksum over impossible sums (written so by a bug, not damaged on disk): the sanity checks."""
    bad = _stats()
    bad[0].sum_xx[0, 1] += 1e6  # not symmetric, and past the Cauchy-Schwarz bound
    cached_calibration(tmp_path, {"k": 1}, lambda: bad)  # read back at once: refused, kept for this run
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        stats, hit, _ = cached_calibration(tmp_path, {"k": 1}, _stats)
    assert not hit and "not symmetric" in caplog.text
    torch.testing.assert_close(stats[0].sum_xx, _stats()[0].sum_xx)


def test_computed_statistics_come_back_lazily_from_the_entry(tmp_path):
    stats, hit, path = cached_calibration(tmp_path, {"k": 1}, _stats)
    assert not hit and stats.accumulators.path == path  # read from the entry: the computed sums can be freed
    torch.testing.assert_close(stats[0].sum_ax, _stats()[0].sum_ax, rtol=0, atol=0)
    moved = _stats()
    assert moved.to("cpu")[0].sum_xx is moved[0].sum_xx  # already there: shared, not copied


def test_non_finite_cached_statistics_are_recomputed(tmp_path):
    bad = _stats()
    bad[0].sum_xx[0, 0] = float("nan")
    cached_calibration(tmp_path, {"k": 1}, lambda: bad)
    stats, hit, _ = cached_calibration(tmp_path, {"k": 1}, _stats)
    assert not hit and torch.isfinite(stats[0].sum_xx).all()


@pytest.mark.parametrize("error", ["os", "safetensors"])
def test_failed_cache_write_keeps_the_statistics(tmp_path, monkeypatch, caplog, error):
    """A full disk: OSError from a plain write, SafetensorError (not an OSError) from safetensors' writer."""
    from safetensors import SafetensorError

    import nbl.calib.result

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        if error == "os":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(nbl.calib.result, "save_file", disk_full)
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        stats, hit, path = cached_calibration(tmp_path, {"k": 1}, _stats)
    assert not hit and stats[0].count == 10
    assert "No space left" in caplog.text and "kept for this run only" in caplog.text
    assert not path.exists() and not list(tmp_path.glob("*.tmp*"))


def test_grown_steps_survive_a_failed_write(tmp_path, monkeypatch, caplog):
    import nbl.cache

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nbl.cache, "atomic_write_text", disk_full)
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        steps = grown_steps(tmp_path, {"k": 1}, lambda earlier: [*earlier, {"layer": 3}])
    assert steps == [{"layer": 3}] and "kept for this run only" in caplog.text


def test_damaged_json_entry_is_recomputed(tmp_path, caplog):
    cached_json(tmp_path, {"k": 1}, lambda: {"acc": 0.5})
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"fields": {"k": 1}, "val')
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        value, hit = cached_json(tmp_path, {"k": 1}, lambda: {"acc": 0.25})
    assert (value, hit) == ({"acc": 0.25}, False) and str(entry) in caplog.text


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_grown_steps_only_grow_and_survive_a_bad_entry(tmp_path, caplog):
    from nbl.cache import grown_steps

    fields = {"what": "greedy"}
    seen = []

    def grow_to(n):
        def grow(earlier):
            seen.append(len(earlier))
            return earlier[:n] if len(earlier) >= n else earlier + [{"step": i} for i in range(len(earlier), n)]

        return grow

    assert grown_steps(tmp_path, fields, grow_to(2)) == [{"step": 0}, {"step": 1}]
    assert grown_steps(tmp_path, fields, grow_to(4)) == [{"step": i} for i in range(4)]
    assert grown_steps(tmp_path, fields, grow_to(1)) == [{"step": 0}]  # a prefix, and the entry keeps 4
    assert grown_steps(tmp_path, fields, grow_to(3)) == [{"step": i} for i in range(3)]
    assert seen == [0, 2, 4, 4]
    (entry,) = tmp_path.glob("*.json")
    entry.write_text("{ torn")
    assert grown_steps(tmp_path, fields, grow_to(2)) == [{"step": 0}, {"step": 1}]
    assert "ignoring unreadable cache entry" in caplog.text and seen[-1] == 0
    assert grown_steps(tmp_path, {"what": "other"}, grow_to(1)) == [{"step": 0}] and seen[-1] == 0


def test_a_read_only_cache_serves_its_hits_and_computes_its_misses(tmp_path, monkeypatch, caplog):
    """No lock file can be made in a read-only folder (root ignores permissions, so the lock is refused here)."""
    import nbl.cache

    cached_calibration(tmp_path, {"k": 1}, _stats)

    def no_lock(path):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(nbl.cache, "file_lock", no_lock)
    assert cached_calibration(tmp_path, {"k": 1}, lambda: pytest.fail("recomputed a hit"))[1]
    with caplog.at_level(logging.WARNING, logger="nbl.cache"):
        stats, hit, path = cached_calibration(tmp_path, {"k": 2}, _stats)
    assert not hit and stats[0].count == 10 and not path.exists() and "not writable" in caplog.text


def test_a_linked_key_listing_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not the cache's\n")
    folder = tmp_path / "stats"
    folder.mkdir()
    listing = folder / f"{cache_key({'k': 1})}.fields.json"
    listing.symlink_to(victim)
    cached_calibration(folder, {"k": 1}, _stats)
    assert victim.read_text() == "not the cache's\n" and not listing.is_symlink() and '"k": 1' in listing.read_text()
