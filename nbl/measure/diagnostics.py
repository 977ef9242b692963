"""How good is a fitted linear map on other tokens: error from a held-out accumulator's sums alone."""

from __future__ import annotations

import torch

from nbl.core.stats import CovarianceAccumulator


def heldout_errors(acc: CovarianceAccumulator, w: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Errors of a ~ W x + b on the tokens summarised by ``acc`` (float64, no activations needed).

    relative: E||a - W x - b||^2 / E||a - E a||^2  (1 = no better than predicting the mean)
    drop_relative: E||a||^2 / E||a - E a||^2       (the same ratio when the sub-block is dropped)
    """
    n = acc.count
    w = w.to(acc.sum_xx)
    b = b.to(acc.sum_xx)
    e_aa = torch.trace(acc.sum_aa) / n
    e_a_wx = (w * acc.sum_ax).sum() / n  # E[a . W x] = tr(W S_xa) / n
    e_wx_wx = torch.trace(w @ acc.sum_xx @ w.T) / n
    mean_x, mean_a = acc.sum_x / n, acc.sum_a / n
    mse = e_aa - 2 * e_a_wx - 2 * mean_a @ b + e_wx_wx + 2 * (w @ mean_x) @ b + b @ b
    variance = torch.trace(acc.cov_aa())
    return {"relative": float(mse / variance), "drop_relative": float(e_aa / variance)}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))
