"""Closed-form NBL math on accumulated statistics: the LMMSE map and the CCA bound (float64)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from nbl.stats import CovarianceAccumulator

CCATarget = Literal["residual", "attention"]


def fit_lmmse(acc: CovarianceAccumulator, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LMMSE estimate a ~ W x + b: W = C_ax C_xx^{-1}, b = mu_a - W mu_x (float64, by a solve).

    ``ridge`` adds ``ridge * tr(C_xx) / d_in`` to the diagonal of C_xx; 0 gives the exact closed form.
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite non-negative number, got {ridge}")
    c_xx = acc.cov_xx()
    c_ax = acc.cov_ax()
    _check_finite(c_xx, "C_xx")
    _check_finite(c_ax, "C_ax")
    if ridge > 0:
        c_xx = c_xx + ridge * (torch.trace(c_xx) / acc.d_in) * torch.eye(acc.d_in, dtype=c_xx.dtype, device=c_xx.device)
    # C_xx is symmetric, so W^T = C_xx^{-1} C_xa is a solve against C_xx.
    chol, info = torch.linalg.cholesky_ex(c_xx)
    if int(info) == 0:
        w_t = torch.cholesky_solve(c_ax.T.contiguous(), chol)
    else:  # singular (rank-deficient data, no ridge): the minimum-norm solution, the same on every device
        w_t = _psd_pseudo_power(c_xx, -1.0, 1e-12) @ c_ax.T
    w = w_t.T.contiguous()
    b = acc.mean_a - w @ acc.mean_x
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError("the fitted map has NaN or inf entries (C_xx is too ill-conditioned: try a ridge > 0)")
    return w, b


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or inf entries: the calibration statistics are corrupt")


def _psd_pseudo_power(c: torch.Tensor, power: float, rel_floor: float) -> torch.Tensor:
    """c^power of a symmetric PSD matrix on its range (eigenvalues below rel_floor * max count as zero).

    By eigendecomposition, so the answer is the same on CPU and GPU up to round-off (the CUDA driver
    of ``torch.linalg.lstsq`` assumes full rank).
    """
    evals, evecs = torch.linalg.eigh(c)
    keep = evals > rel_floor * evals.max().clamp_min(0.0)
    scaled = torch.zeros_like(evals)
    scaled[keep] = evals[keep].pow(power)
    return (evecs * scaled) @ evecs.T


def canonical_correlations(
    acc: CovarianceAccumulator, target: CCATarget = "residual", rel_floor: float = 1e-10
) -> torch.Tensor:
    """Canonical correlations between x and y (y = x + a for "residual", y = a for "attention")."""
    c_xx = acc.cov_xx()
    c_ax = acc.cov_ax()
    c_aa = acc.cov_aa()
    if target == "residual":
        if acc.d_in != acc.d_out:
            raise ValueError("target='residual' needs d_in == d_out")
        c_yx = c_xx + c_ax
        c_yy = c_xx + c_ax + c_ax.T + c_aa
    elif target == "attention":
        c_yx = c_ax
        c_yy = c_aa
    else:
        raise ValueError(f"unknown CCA target {target!r}; use 'residual' or 'attention'")
    for m, name in ((c_xx, "C_xx"), (c_yx, "C_yx"), (c_yy, "C_yy")):
        _check_finite(m, name)
    k = _psd_pseudo_power((c_yy + c_yy.T) / 2, -0.5, rel_floor) @ c_yx @ _psd_pseudo_power(c_xx, -0.5, rel_floor)
    return torch.linalg.svdvals(k).clamp(0.0, 1.0)


def cca_bound(acc: CovarianceAccumulator, target: CCATarget = "residual", rel_floor: float = 1e-10) -> float:
    """NMSE bound of the LMMSE fit (paper, Thm 3.2): sum_i (1 - rho_i^2) + (d_out - r). Lower = more linear."""
    rho = canonical_correlations(acc, target, rel_floor)
    r = min(acc.d_in, acc.d_out)
    bound = float((1.0 - rho[:r] ** 2).sum()) + (acc.d_out - r)
    if not math.isfinite(bound):
        raise ValueError(f"CCA bound is {bound}: the calibration statistics are corrupt")
    return bound
