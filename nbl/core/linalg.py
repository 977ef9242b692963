"""Closed-form NBL math on accumulated statistics: the LMMSE map and the CCA bound (float64)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from nbl.core.stats import CovarianceAccumulator

CCATarget = Literal["residual", "attention"]
Ridge = float | Mapping[int, float]  # one ridge for every layer, or one per layer (replacement.ridge=auto)


REL_FLOOR = 1e-10  # eigenvalues of a covariance below this fraction of its largest count as zero


def fit_lmmse(
    acc: CovarianceAccumulator, ridge: float = 0.0, rel_floor: float = REL_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """LMMSE estimate a ~ W x + b: W = C_ax C_xx^{-1}, b = mu_a - W mu_x (float64, by a solve).

    ``ridge`` adds ``ridge * tr(C_xx) / d_in`` to the diagonal of C_xx; 0 gives the exact closed form. When an
    eigenvalue of C_xx is below ``rel_floor`` times the largest (the floor the CCA bound uses), those directions
    carry no information the data can pin down: W is the minimum-norm solution on the others (C_xx's
    pseudo-inverse), the same on every device, instead of a solve that amplifies round-off.
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
    chol = _cholesky_or_none(c_xx, rel_floor)
    if chol is not None:
        w_t = torch.cholesky_solve(c_ax.T.contiguous(), chol)
    else:  # (nearly) singular: rank-deficient data, no ridge
        w_t = _psd_pseudo_power(c_xx, -1.0, rel_floor) @ c_ax.T
    w = w_t.T.contiguous()
    b = acc.mean_a - w @ acc.mean_x
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError("the fitted map has NaN or inf entries (C_xx is too ill-conditioned: try a ridge > 0)")
    return w, b


def reduce_rank(
    w: torch.Tensor, acc: CovarianceAccumulator, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` map a ~ U V x + b given the LMMSE map ``w`` fitted on ``acc`` (reduced-rank
    regression): U holds the top eigenvectors of the fitted outputs' covariance W C_xx W^T, V = U^T W, so
    U V = U U^T W projects the full map's predictions onto their ``rank`` strongest directions; b re-centres.
    Returns (U: d_out x r, V: r x d_in, b), float64. The error added over the full map is the sum of the
    dropped eigenvalues (on the fitted tokens)."""
    if not 0 < rank <= min(acc.d_in, acc.d_out):
        raise ValueError(f"rank must be in 1..{min(acc.d_in, acc.d_out)}, got {rank}")
    w = w.to(acc.sum_x)
    predicted = w @ acc.cov_xx() @ w.T
    _, evecs = torch.linalg.eigh((predicted + predicted.T) / 2)  # ascending
    u = evecs[:, -rank:].flip(-1).contiguous()
    v = u.T @ w
    b = acc.mean_a - u @ (v @ acc.mean_x)
    return u, v, b


def ridge_of(ridge: Ridge, layer: int) -> float:
    """The ridge of one layer: a number for every layer, or a per-layer mapping (``replacement.ridge=auto``)."""
    return float(ridge[layer]) if isinstance(ridge, Mapping) else float(ridge)


def heldout_error(w: torch.Tensor, b: torch.Tensor, heldout: CovarianceAccumulator) -> float:
    """Mean squared error per token, sum over outputs, of a ~ W x + b on the tokens summed in ``heldout``.

    Exact from the held-out second moments (centred, so no cancellation between large raw sums):
    E||a - W x - b||^2 = tr(C_aa) - 2 tr(W C_xa) + tr(W C_xx W^T) + ||mu_a - W mu_x - b||^2.
    """
    w = w.to(heldout.sum_x)
    b = b.to(heldout.sum_x)
    c_xx, c_ax, c_aa = heldout.cov_xx(), heldout.cov_ax(), heldout.cov_aa()
    spread = torch.trace(c_aa) - 2 * (w * c_ax).sum() + ((w @ c_xx) * w).sum()
    offset = heldout.mean_a - w @ heldout.mean_x - b
    err = float(spread + offset @ offset)
    if not math.isfinite(err):
        raise ValueError("held-out error is not finite: the statistics are corrupt")
    return max(err, 0.0)


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


def _cca_blocks(acc: CovarianceAccumulator, target: CCATarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_xx, C_yx, C_yy) for y = x + a ("residual") or y = a ("attention"), checked finite."""
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
    return c_xx, c_yx, (c_yy + c_yy.T) / 2


def _cholesky_or_none(c: torch.Tensor, rel_floor: float) -> torch.Tensor | None:
    """The Cholesky factor of c, or None when an eigenvalue of c is below ``rel_floor`` times the largest
    (where :func:`canonical_correlations` drops directions). Eigenvalues alone cost a fraction of an
    eigendecomposition with vectors."""
    evals = torch.linalg.eigvalsh(c)
    if not bool(evals.min() > rel_floor * evals.max()):
        return None
    chol, info = torch.linalg.cholesky_ex(c)
    return chol if int(info) == 0 else None


def canonical_correlations(
    acc: CovarianceAccumulator, target: CCATarget = "residual", rel_floor: float = REL_FLOOR
) -> torch.Tensor:
    """Canonical correlations between x and y (y = x + a for "residual", y = a for "attention"):
    the singular values of C_yy^{-1/2} C_yx C_xx^{-1/2}, by pseudo-inverse square roots (eigenvalue floor)."""
    c_xx, c_yx, c_yy = _cca_blocks(acc, target)
    k = _psd_pseudo_power(c_yy, -0.5, rel_floor) @ c_yx @ _psd_pseudo_power(c_xx, -0.5, rel_floor)
    return torch.linalg.svdvals(k).clamp(0.0, 1.0)


def cca_bound(acc: CovarianceAccumulator, target: CCATarget = "residual", rel_floor: float = REL_FLOOR) -> float:
    """NMSE bound of the LMMSE fit (paper, Thm 3.2): sum_i (1 - rho_i^2) + (d_out - r) = d_out - sum_i rho_i^2.
    Lower = more linear.

    sum_i rho_i^2 = ||C_yy^{-1/2} C_yx C_xx^{-1/2}||_F^2 = ||L_y^{-1} C_yx L_x^{-T}||_F^2 with the Cholesky
    factors C = L L^T: two factorizations and two triangular solves, several times cheaper than the
    eigendecompositions and SVD of :func:`canonical_correlations`, which remains the path (and gives the
    same value) when an eigenvalue of C_xx or C_yy is below ``rel_floor`` times the largest: the floor
    then drops those directions.
    """
    c_xx, c_yx, c_yy = _cca_blocks(acc, target)
    l_x, l_y = _cholesky_or_none(c_xx, rel_floor), _cholesky_or_none(c_yy, rel_floor)
    if l_x is not None and l_y is not None:
        m = torch.linalg.solve_triangular(l_y, c_yx, upper=False)  # L_y^{-1} C_yx
        m = torch.linalg.solve_triangular(l_x, m.T, upper=False)  # (L_y^{-1} C_yx L_x^{-T})^T
        sum_rho2 = float((m * m).sum())
    else:
        sum_rho2 = float((canonical_correlations(acc, target, rel_floor) ** 2).sum())
    bound = acc.d_out - sum_rho2
    if not math.isfinite(bound):
        raise ValueError(f"CCA bound is {bound}: the calibration statistics are corrupt")
    return bound
