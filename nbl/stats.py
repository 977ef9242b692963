"""Streaming second-order statistics of (x, a) pairs, accumulated in float64.

Everything NBL needs about a layer (the LMMSE map, the CCA bound) is a function of five
running sums and a count, so calibration memory is O(d^2) per layer whatever the token count.
"""

from __future__ import annotations

import torch

_F64 = torch.float64


class CovarianceAccumulator:
    """Running sums of x, a, x x^T, a x^T, a a^T over tokens, in float64.

    The sums live on the device of the first update (a GPU when calibration runs there).
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str | None = None) -> None:
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"dimensions must be positive, got d_in={d_in}, d_out={d_out}")
        self.d_in = d_in
        self.d_out = d_out
        self.count = 0
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.sum_x = torch.zeros(d_in, dtype=_F64, device=dev)
        self.sum_a = torch.zeros(d_out, dtype=_F64, device=dev)
        self.sum_xx = torch.zeros(d_in, d_in, dtype=_F64, device=dev)
        self.sum_ax = torch.zeros(d_out, d_in, dtype=_F64, device=dev)
        self.sum_aa = torch.zeros(d_out, d_out, dtype=_F64, device=dev)
        self._placed = device is not None

    # -- accumulation -------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "sum_x": self.sum_x,
            "sum_a": self.sum_a,
            "sum_xx": self.sum_xx,
            "sum_ax": self.sum_ax,
            "sum_aa": self.sum_aa,
        }

    def _place(self, device: torch.device) -> None:
        for name, t in self._tensors().items():
            setattr(self, name, t.to(device))
        self._placed = True

    @torch.no_grad()
    def update(self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add tokens: x shaped (..., d_in), a shaped (..., d_out); mask (...) marks real tokens."""
        if x.shape[-1] != self.d_in or a.shape[-1] != self.d_out:
            raise ValueError(
                f"expected last dims ({self.d_in}, {self.d_out}), got {tuple(x.shape)} and {tuple(a.shape)}"
            )
        if x.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"token shapes differ: {tuple(x.shape[:-1])} vs {tuple(a.shape[:-1])}")
        x = x.reshape(-1, self.d_in)
        a = a.reshape(-1, self.d_out)
        if mask is not None:
            if mask.numel() != x.shape[0]:
                raise ValueError(f"mask has {mask.numel()} entries for {x.shape[0]} tokens")
            keep = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            x = x[keep]
            a = a[keep]
        if x.shape[0] == 0:
            return
        if not self._placed:
            self._place(x.device)
        x = x.to(device=self.sum_x.device, dtype=_F64)
        a = a.to(device=self.sum_x.device, dtype=_F64)
        self.sum_x += x.sum(0)
        self.sum_a += a.sum(0)
        self.sum_xx.addmm_(x.T, x)
        self.sum_ax.addmm_(a.T, x)
        self.sum_aa.addmm_(a.T, a)
        self.count += x.shape[0]

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's sums into this one (shards, data-parallel ranks); returns self."""
        if (other.d_in, other.d_out) != (self.d_in, self.d_out):
            raise ValueError("cannot merge accumulators of different dimensions")
        if other.count == 0:
            return self
        if not self._placed:
            self._place(other.sum_x.device)
        for name, t in self._tensors().items():
            t += getattr(other, name).to(t.device)
        self.count += other.count
        return self

    # -- moments --------------------------------------------------------------------------------
    def _require_tokens(self) -> None:
        if self.count < 2:
            raise ValueError(f"need at least 2 tokens to estimate covariances, have {self.count}")

    @property
    def mean_x(self) -> torch.Tensor:
        self._require_tokens()
        return self.sum_x / self.count

    @property
    def mean_a(self) -> torch.Tensor:
        self._require_tokens()
        return self.sum_a / self.count

    def _cov(self, s_uv: torch.Tensor, mean_u: torch.Tensor, mean_v: torch.Tensor) -> torch.Tensor:
        return s_uv / self.count - torch.outer(mean_u, mean_v)

    def cov_xx(self) -> torch.Tensor:
        c = self._cov(self.sum_xx, self.mean_x, self.mean_x)
        return (c + c.T) / 2

    def cov_ax(self) -> torch.Tensor:
        return self._cov(self.sum_ax, self.mean_a, self.mean_x)

    def cov_aa(self) -> torch.Tensor:
        c = self._cov(self.sum_aa, self.mean_a, self.mean_a)
        return (c + c.T) / 2

    def check(self) -> None:
        """Raise if a running sum holds NaN or inf (an overflow upstream, or a corrupt file)."""
        for name, t in self._tensors().items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} has NaN or inf entries")

    # -- serialisation (safetensors-friendly: plain tensors, no pickle) -------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self._tensors().items()}
        state["count"] = torch.tensor([self.count], dtype=torch.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CovarianceAccumulator:
        d_out, d_in = state["sum_ax"].shape
        acc = cls(int(d_in), int(d_out), device="cpu")
        for name in acc._tensors():
            setattr(acc, name, state[name].to(_F64).clone())
        acc.count = int(state["count"].item())
        return acc
