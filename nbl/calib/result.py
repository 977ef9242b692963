"""Calibration statistics: per layer, the running sums of one sub-block's (input, output) pairs, in memory or read
lazily from a safetensors file."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nbl.core.stats import CovarianceAccumulator


class CalibrationResult(Mapping[int, CovarianceAccumulator]):
    """Layer index -> accumulator, plus the per-layer sum of cos(x, x + a) for the drop baseline."""

    def __init__(self, accumulators: Mapping[int, CovarianceAccumulator], cosine_sums: dict[int, float]) -> None:
        self.accumulators = accumulators
        self.cosine_sums = cosine_sums

    @classmethod
    def empty(cls, layers: Iterable[int], d: int, gram_dtype: str = "float64", width: int = 1) -> CalibrationResult:
        """Zero statistics for ``layers`` of hidden size d; inputs of ``width`` d features (a conv map's shifted
        inputs: :func:`nbl.core.surgery.shifted_features`)."""
        layers = list(layers)
        accumulators = {i: CovarianceAccumulator(width * d, d, gram_dtype=gram_dtype) for i in layers}
        return cls(accumulators, dict.fromkeys(layers, 0.0))

    def to(self, device: torch.device | str) -> CalibrationResult:
        """The same statistics with every sum on ``device`` (score and fit where the model computes).

        Statistics opened lazily stay lazy: each layer is read straight onto ``device`` when asked for.
        """
        if isinstance(self.accumulators, _StoredLayers):
            lazy = self.accumulators
            return CalibrationResult(_StoredLayers(lazy.path, lazy.counts, device, lazy.checksums), dict(self.cosine_sums))
        target = torch.device(device)
        moved = {  # sums already there are shared, not copied (a copy doubles the statistics' peak)
            i: acc if acc.sum_x.device == target else CovarianceAccumulator.from_state_dict(acc.state_dict(), target)
            for i, acc in self.accumulators.items()
        }
        return CalibrationResult(moved, dict(self.cosine_sums))

    def __getitem__(self, layer: int) -> CovarianceAccumulator:
        return self.accumulators[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.accumulators))

    def __len__(self) -> int:
        return len(self.accumulators)

    def count(self, layer: int) -> int:
        """Tokens summarised for ``layer`` (read without the sums when the statistics are lazy)."""
        if isinstance(self.accumulators, _StoredLayers):
            return self.accumulators.counts[layer]
        return self.accumulators[layer].count

    def mean_cosine(self, layer: int) -> float:
        """Mean over calibration tokens of cos(x_t, x_t + a_t)."""
        return self.cosine_sums[layer] / self.count(layer)

    def mean_cosines(self) -> dict[int, float]:
        """:meth:`mean_cosine` of every layer (the attention-drop score, summed during calibration: free)."""
        return {i: self.mean_cosine(i) for i in self}

    def check(self) -> None:
        """Raise unless every layer holds finite sums over the same tokens with the same dimensions."""
        if not self.accumulators:
            raise ValueError("no layers in the calibration statistics")
        first = None
        for i, acc in self.accumulators.items():  # lazy statistics: each layer read once
            first = first or acc
            if (acc.d_in, acc.d_out, acc.count) != (first.d_in, first.d_out, first.count):
                raise ValueError(
                    f"layer {i} has shape/count {(acc.d_in, acc.d_out, acc.count)}, others "
                    f"{(first.d_in, first.d_out, first.count)}"
                )
            if acc.count < 2:
                raise ValueError(f"layer {i} holds {acc.count} tokens")
            try:
                acc.check()
            except ValueError as err:
                raise ValueError(f"layer {i}: {err}") from None
            if not math.isfinite(self.cosine_sums[i]):
                raise ValueError(f"layer {i}: the cosine sum is not finite")

    @property
    def num_tokens(self) -> int:
        return self.count(next(iter(self))) if len(self) else 0

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """One safetensors file (no pickle); ``metadata`` is kept as strings in its header, with a checksum of
        every layer's tensors that each read verifies.

        Sums on a GPU are copied to host memory for the write (all layers: 12.9 GB for an 8B model's attention
        statistics); sums already on the host (layer by layer with offload) are written without a copy.
        """
        tensors: dict[str, torch.Tensor] = {}
        checksums: dict[int, str] = {}
        for i, acc in self.accumulators.items():
            state = {**acc.state_dict(), "cosine_sum": torch.tensor([self.cosine_sums[i]], dtype=torch.float64)}
            checksums[i] = _checksum(state)
            tensors.update({f"layer{i}.{name}": t.contiguous() for name, t in state.items()})
        header = {
            "nbl_layers": json.dumps(sorted(self.accumulators)),
            "nbl_checksums": json.dumps(checksums),
            **(metadata or {}),
        }
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", lazy: bool = False) -> CalibrationResult:
        """Read statistics written by :meth:`save`. ``lazy``: read each layer from the file when it is asked
        for (and not keep it), so memory holds one layer's sums (3 d^2 + 2 d floats), not L of them. Every
        layer read is checked against its checksum; a file written without checksums is refused."""
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "nbl_checksums" not in header:
                raise ValueError(f"{path} was written without checksums: it cannot be verified")
            layers = json.loads(header["nbl_layers"])
            checksums = {int(i): digest for i, digest in json.loads(header["nbl_checksums"]).items()}
            cos = {i: float(f.get_tensor(f"layer{i}.cosine_sum").item()) for i in layers}
            counts = {i: int(f.get_tensor(f"layer{i}.count").item()) for i in layers}
        stored = _StoredLayers(Path(path), counts, device, checksums)
        return cls(stored if lazy else {i: stored[i] for i in layers}, cos)


def _checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a layer's tensors (names, dtypes, shapes and bytes), read back on the host."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _StoredLayers(Mapping[int, CovarianceAccumulator]):
    """Layer index -> accumulator, read from a statistics file on every access (nothing kept in memory) and
    checked against the checksum written with it: a flipped byte or a zeroed row is an error, not a value."""

    def __init__(self, path: Path, counts: dict[int, int], device: torch.device | str, checksums: dict[int, str]
                 ) -> None:  # fmt: skip
        self.path, self.counts, self.device, self.checksums = path, counts, torch.device(device), checksums
        self.layers = sorted(counts)

    def __getitem__(self, layer: int) -> CovarianceAccumulator:
        if layer not in self.layers:
            raise KeyError(layer)
        prefix = f"layer{layer}."
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        if _checksum(state) != self.checksums.get(layer):
            raise ValueError(f"layer {layer} of {self.path} does not match its checksum: the file is damaged")
        state.pop("cosine_sum")
        return CovarianceAccumulator.from_state_dict(state, self.device)

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)
