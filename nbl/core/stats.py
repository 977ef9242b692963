"""Streaming second-order statistics of (x, a) pairs, accumulated in float64.

Everything NBL needs about a layer (the LMMSE map, the CCA bound) is a function of five
running sums and a count, so calibration memory is O(d^2) per layer whatever the token count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_F64 = torch.float64


GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@contextmanager
def full_float32_matmul() -> Iterator[None]:
    """CUDA float32 products without TF32 (10 mantissa bits: far too few for Gram sums) inside the block.

    Through torch's precision API (``fp32_precision``) where it exists: after a user set TF32 through it, reading
    the legacy ``allow_tf32`` flag raises. Setting and restoring the new one is safe whichever the user set.
    """
    matmul = torch.backends.cuda.matmul
    name, off = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    saved = getattr(matmul, name)
    setattr(matmul, name, off)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


class CovarianceAccumulator:
    """Running sums of x, a, x x^T, a x^T, a a^T over tokens, in float64.

    The sums live on the device of the first update (a GPU when calibration runs there).
    ``gram_dtype="float32"`` computes each batch's Gram products at float32 speed (most GPUs run
    float64 10-60x slower): the batch is shifted by its mean, the shifted Gram products are formed in
    float32 and added to the float64 sums with the exact correction terms of the shift, so only the
    rounding of the centred products (relative ~1e-7) is lost, not the mean.
    """

    def __init__(
        self, d_in: int, d_out: int, device: torch.device | str | None = None, gram_dtype: str = "float64"
    ) -> None:
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"dimensions must be positive, got d_in={d_in}, d_out={d_out}")
        if gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {sorted(GRAM_DTYPES)}, got {gram_dtype!r}")
        self.gram_dtype = gram_dtype
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

    def move_(self, device: torch.device | str) -> CovarianceAccumulator:
        """Keep the sums on ``device`` from now on (in place); returns self."""
        self._place(torch.device(device))
        return self

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
        if self.gram_dtype == "float32":
            self._update_shifted(x, a)
            return
        x = x.to(device=self.sum_x.device, dtype=_F64)
        a = a.to(device=self.sum_x.device, dtype=_F64)
        self.sum_x += x.sum(0)
        self.sum_a += a.sum(0)
        self.sum_xx.addmm_(x.T, x)
        self.sum_ax.addmm_(a.T, x)
        self.sum_aa.addmm_(a.T, a)
        self.count += x.shape[0]

    def _update_shifted(self, x: torch.Tensor, a: torch.Tensor) -> None:
        """Float32 Gram products of mean-shifted values; float64 sums (see the class docstring).

        With u = x - m (m the batch mean in float32) and s = sum u:
        sum x x^T = sum u u^T + s m^T + m s^T + n m m^T, exactly; only sum u u^T is formed in float32.
        """
        dev, n = self.sum_x.device, x.shape[0]
        x32 = x.to(device=dev, dtype=torch.float32)
        a32 = a.to(device=dev, dtype=torch.float32)
        m_x = x32.to(_F64).mean(0).to(torch.float32)
        m_a = a32.to(_F64).mean(0).to(torch.float32)
        u, v = x32 - m_x, a32 - m_a
        s_u, s_v = u.to(_F64).sum(0), v.to(_F64).sum(0)
        mx, ma = m_x.to(_F64), m_a.to(_F64)
        with full_float32_matmul():
            g_uu, g_vu, g_vv = (u.T @ u).to(_F64), (v.T @ u).to(_F64), (v.T @ v).to(_F64)
        self.sum_x += s_u + n * mx
        self.sum_a += s_v + n * ma
        self.sum_xx += g_uu + torch.outer(s_u, mx) + torch.outer(mx, s_u) + n * torch.outer(mx, mx)
        self.sum_ax += g_vu + torch.outer(s_v, mx) + torch.outer(ma, s_u) + n * torch.outer(ma, mx)
        self.sum_aa += g_vv + torch.outer(s_v, ma) + torch.outer(ma, s_v) + n * torch.outer(ma, ma)
        self.count += n

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

    def check(self, rel_tol: float = 1e-4) -> None:
        """Raise if a running sum holds NaN or inf (an overflow upstream, or a corrupt file), or could not be a sum
        of products: sum_xx and sum_aa symmetric with a non-negative diagonal, variances >= 0, and every entry of
        sum_xx, sum_ax, sum_aa within the Cauchy-Schwarz bound sqrt(S_ii S_jj). ``rel_tol`` allows the round-off
        of float32 Gram products. O(d^2): cheap beside the O(d^3) fits."""
        for name, t in self._tensors().items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} has NaN or inf entries")
        diag_x, diag_a = self.sum_xx.diagonal(), self.sum_aa.diagonal()
        for name, gram, total, diag in (("sum_xx", self.sum_xx, self.sum_x, diag_x), ("sum_aa", self.sum_aa, self.sum_a, diag_a)):
            bound = torch.sqrt(torch.outer(diag.clamp_min(0), diag.clamp_min(0)))
            slack = rel_tol * float(diag.abs().max()) + 1e-300
            if float(diag.min()) < -slack or float((diag - total**2 / max(self.count, 1)).min()) < -slack:
                raise ValueError(f"{name} has a negative variance: not a sum of squares")
            if float((gram - gram.T).abs().max()) > slack or bool(((gram.abs() - bound) > slack).any()):
                raise ValueError(f"{name} is not symmetric or breaks the Cauchy-Schwarz bound: not a Gram sum")
        cross = torch.sqrt(torch.outer(diag_a.clamp_min(0), diag_x.clamp_min(0)))
        if bool(((self.sum_ax.abs() - cross) > rel_tol * float(cross.max()) + 1e-300).any()):
            raise ValueError("sum_ax breaks the Cauchy-Schwarz bound: not a sum of products")

    # -- serialisation (safetensors-friendly: plain tensors, no pickle) -------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self._tensors().items()}
        state["count"] = torch.tensor([self.count], dtype=torch.int64)
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> CovarianceAccumulator:
        d_out, d_in = state["sum_ax"].shape
        acc = cls(int(d_in), int(d_out), device=device)
        for name in acc._tensors():
            setattr(acc, name, state[name].to(device=device, dtype=_F64, copy=True))
        acc.count = int(state["count"].item())
        return acc
