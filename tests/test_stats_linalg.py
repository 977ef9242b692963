"""The math against independent computations: numpy least squares, QR-based CCA, float64 closed forms."""

import numpy as np
import pytest
import torch

from nbl import CovarianceAccumulator, canonical_correlations, cca_bound, fit_lmmse
from nbl.core.linalg import _cholesky_or_none


def _correlated(n: int, d_in: int, d_out: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in)) + rng.normal(size=d_in) * 3
    a = np.tanh(x @ rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)) + noise * rng.normal(size=(n, d_out))
    return x, a


def _acc(x: np.ndarray, a: np.ndarray) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(x.shape[1], a.shape[1])
    acc.update(torch.from_numpy(x), torch.from_numpy(a))
    return acc


def test_exact_recovery_of_affine_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 7)) * 5 + 2
    m, c = rng.normal(size=(7, 7)), rng.normal(size=7)
    w, b = fit_lmmse(_acc(x, x @ m.T + c))
    assert w.dtype == torch.float64 and w.shape == (7, 7) and b.shape == (7,)
    np.testing.assert_allclose(w.numpy(), m, atol=1e-9)
    np.testing.assert_allclose(b.numpy(), c, atol=1e-9)


def test_lmmse_equals_numpy_least_squares():
    x, a = _correlated(2000, 6, 5, noise=0.3)
    w, b = fit_lmmse(_acc(x, a))
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, a, rcond=None)
    np.testing.assert_allclose(w.numpy(), coef[:-1].T, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), coef[-1], atol=1e-8)


def _numpy_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bjorck-Golub: canonical correlations are the singular values of Q_x^T Q_y (centred data)."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


@pytest.mark.parametrize("target", ["residual", "attention"])
def test_bound_equals_numpy_cca(target):
    x, a = _correlated(3000, 8, 8, noise=0.5, seed=2)
    y = x + a if target == "residual" else a
    rho = _numpy_cca(x, y)
    expected = float(np.sum(1 - rho**2))
    np.testing.assert_allclose(canonical_correlations(_acc(x, a), target).numpy(), rho, atol=1e-8)
    assert cca_bound(_acc(x, a), target) == pytest.approx(expected, abs=1e-8)


def test_bound_with_unequal_dims_counts_missing_directions():
    x, a = _correlated(3000, 8, 5, noise=0.5, seed=3)
    expected = float(np.sum(1 - _numpy_cca(x, a) ** 2))
    assert cca_bound(_acc(x, a), "attention") == pytest.approx(expected, abs=1e-8)  # r = d_out: no extra term
    x2, a2 = _correlated(3000, 5, 8, noise=0.5, seed=3)
    expected2 = float(np.sum(1 - _numpy_cca(x2, a2) ** 2)) + (8 - 5)
    assert cca_bound(_acc(x2, a2), "attention") == pytest.approx(expected2, abs=1e-8)


@pytest.mark.parametrize("target", ["residual", "attention"])
def test_bound_zero_for_linear_map_and_within_range_otherwise(target):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 6))
    a = x @ rng.normal(size=(6, 6)) + 1.0
    assert cca_bound(_acc(x, a), target) == pytest.approx(0.0, abs=1e-8)
    xn, an = _correlated(1000, 6, 6, noise=1.0, seed=5)
    assert 0.0 < cca_bound(_acc(xn, an), target) <= 6.0
    independent = rng.normal(size=(1000, 6))
    assert cca_bound(_acc(x, independent), "attention") > 5.8  # unrelated data: bound near d


def test_chunked_updates_and_merge_equal_one_update():
    x, a = _correlated(999, 5, 4, noise=0.2, seed=6)
    whole = _acc(x, a)
    chunked = CovarianceAccumulator(5, 4)
    for sl in (slice(0, 10), slice(10, 500), slice(500, 999)):
        chunked.update(torch.from_numpy(x[sl]), torch.from_numpy(a[sl]))
    left, right = _acc(x[:300], a[:300]), _acc(x[300:], a[300:])
    merged = left.merge(right)
    for acc in (chunked, merged):
        assert acc.count == whole.count == 999
        for name, t in whole.state_dict().items():
            torch.testing.assert_close(acc.state_dict()[name], t, rtol=1e-12, atol=1e-9)


def test_mask_drops_padding_tokens():
    x, a = _correlated(40, 4, 4, noise=0.1, seed=7)
    xb, ab = torch.from_numpy(x).view(2, 20, 4), torch.from_numpy(a).view(2, 20, 4)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    masked = CovarianceAccumulator(4, 4)
    masked.update(xb, ab, mask)
    keep = mask.view(-1).bool().numpy()
    direct = _acc(x[keep], a[keep])
    assert masked.count == 35
    torch.testing.assert_close(masked.sum_xx, direct.sum_xx)


def test_rank_deficient_inputs_stay_finite():
    rng = np.random.default_rng(8)
    base = rng.normal(size=(300, 3))
    x = np.hstack([base, base[:, :2] * 2.0])  # rank 3 in 5 dims
    a = rng.normal(size=(300, 5))
    for ridge in (0.0, 1e-3):
        w, b = fit_lmmse(_acc(x, a), ridge=ridge)
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert np.isfinite(cca_bound(_acc(x, a)))


def test_ridge_shrinks_towards_zero():
    x, a = _correlated(500, 5, 5, noise=0.3, seed=9)
    w0, _ = fit_lmmse(_acc(x, a))
    w1, _ = fit_lmmse(_acc(x, a), ridge=10.0)
    assert w1.norm() < w0.norm()
    with pytest.raises(ValueError):
        fit_lmmse(_acc(x, a), ridge=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float64(dtype):
    x = torch.randn(64, 8, dtype=dtype)
    a = torch.randn(64, 8, dtype=dtype)
    acc = CovarianceAccumulator(8, 8)
    acc.update(x, a)
    assert acc.sum_xx.dtype == torch.float64
    x64 = x.double()
    torch.testing.assert_close(acc.sum_xx, x64.T @ x64, rtol=1e-12, atol=1e-10)


def test_nan_statistics_raise():
    x, a = _correlated(100, 4, 4, noise=0.1)
    a[3, 1] = np.nan
    acc = _acc(x, a)
    with pytest.raises(ValueError, match="NaN"):
        cca_bound(acc)
    with pytest.raises(ValueError, match="NaN"):
        fit_lmmse(acc)


def test_too_few_tokens_and_shape_errors():
    acc = CovarianceAccumulator(3, 3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        fit_lmmse(acc)
    with pytest.raises(ValueError):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        acc.merge(CovarianceAccumulator(3, 4))


def test_state_dict_round_trip():
    x, a = _correlated(100, 4, 4, noise=0.1)
    acc = _acc(x, a)
    back = CovarianceAccumulator.from_state_dict(acc.state_dict())
    assert back.count == acc.count
    torch.testing.assert_close(back.cov_ax(), acc.cov_ax())


def test_heldout_errors_equal_direct_residuals():
    from nbl.measure.diagnostics import heldout_errors

    x_fit, a_fit = _correlated(800, 5, 5, noise=0.4, seed=10)
    x, a = _correlated(600, 5, 5, noise=0.4, seed=11)
    w, b = fit_lmmse(_acc(x_fit, a_fit))
    errors = heldout_errors(_acc(x, a), w, b)
    residual = a - x @ w.numpy().T - b.numpy()
    variance = ((a - a.mean(0)) ** 2).sum(1).mean()
    assert errors["relative"] == pytest.approx((residual**2).sum(1).mean() / variance, rel=1e-9)
    assert errors["drop_relative"] == pytest.approx((a**2).sum(1).mean() / variance, rel=1e-9)


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    from nbl.measure.diagnostics import spearman

    rng = np.random.default_rng(12)
    x = rng.normal(size=30).round(1).tolist()  # rounding makes ties
    y = (np.array(x) * 0.5 + rng.normal(size=30)).tolist()
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_rank_deficient_fit_is_the_minimum_norm_least_squares_solution():
    rng = np.random.default_rng(11)
    base = rng.normal(size=(400, 3)) * np.array([1.0, 50.0, 0.02])
    x = np.hstack([base, base[:, :2] @ rng.normal(size=(2, 3))]) + 5.0  # rank 3 in 6 dims, offset mean
    a = np.tanh(x @ rng.normal(size=(6, 4))) + 0.1 * rng.normal(size=(400, 4))
    w, b = fit_lmmse(_acc(x, a))
    xc, ac = x - x.mean(0), a - a.mean(0)
    w_np = np.linalg.lstsq(xc, ac, rcond=None)[0].T  # numpy's SVD min-norm solution on centred data
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), a.mean(0) - w_np @ x.mean(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", ["residual", "attention"])
def test_cholesky_bound_equals_the_singular_value_definition(target):
    x, a = _correlated(3000, 12, 12, noise=0.4, seed=21)
    acc = _acc(x, a)
    rho = canonical_correlations(acc, target)
    assert cca_bound(acc, target) == pytest.approx(float((1 - rho**2).sum()), rel=1e-9, abs=1e-10)


def test_singular_covariance_falls_back_to_the_floored_definition():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(500, 3))
    x = np.hstack([base, base[:, :1] * 3.0])  # C_xx singular: a round-off pivot, or a failed factorization
    acc = _acc(x, np.tanh(x) + 0.1 * rng.normal(size=(500, 4)))
    assert _cholesky_or_none(acc.cov_xx(), 1e-10) is None
    rho = canonical_correlations(acc)
    assert cca_bound(acc) == pytest.approx(4 - float((rho**2).sum()), rel=1e-9)


def test_a_nearly_singular_covariance_gets_the_floored_minimum_norm_map():
    """A direction with variance 1e-14 of the largest: a Cholesky factor exists, but solving through it amplifies
    round-off into a huge W; the fit drops the direction as the CCA bound does (numpy's pinv, same floor)."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(2000, 4))
    x = np.hstack([base, base[:, :1] + 1e-7 * rng.normal(size=(2000, 1))])  # col 4 = col 0 up to 1e-7
    a = np.tanh(x[:, :4] @ rng.normal(size=(4, 3))) + 0.1 * rng.normal(size=(2000, 3))
    acc = _acc(x, a)
    c_xx, c_ax = acc.cov_xx().numpy(), acc.cov_ax().numpy()
    evals = np.linalg.eigvalsh(c_xx)
    assert 0 < evals[0] / evals[-1] < 1e-10 and np.linalg.cholesky(c_xx) is not None  # factorable, but floored
    w, b = fit_lmmse(acc)
    w_np = c_ax @ np.linalg.pinv(c_xx, rcond=1e-10, hermitian=True)
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), a.mean(0) - w_np @ x.mean(0), rtol=1e-6, atol=1e-7)
    assert float(w.abs().max()) < 10  # through the factor: entries of order 1e5


def test_float32_gram_products_under_the_new_tf32_api(monkeypatch):
    """torch 2.9+: once TF32 was set through fp32_precision, reading the legacy allow_tf32 flag raises."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        acc = CovarianceAccumulator(8, 8, gram_dtype="float32")
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        acc.update(x, 2 * x)
        assert acc.count == 64 and matmul.fp32_precision == "tf32"  # computed, and the user's setting restored
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_reduced_rank_map_is_the_best_of_its_rank_on_the_fitted_tokens(rank):
    """Against the classical closed form: the truncated SVD of W C_xx^(1/2), mapped back (numpy), and against the
    error of the full map plus the dropped eigenvalues."""
    from nbl.core.linalg import reduce_rank

    x, a = _correlated(3000, 8, 6, noise=0.1)
    acc = _acc(x, a)
    w, _ = fit_lmmse(acc)
    u, v, b = reduce_rank(w, acc, rank)
    assert u.shape == (6, rank) and v.shape == (rank, 8)
    xc = x - x.mean(0)
    c_xx = xc.T @ xc / len(x)
    evals, evecs = np.linalg.eigh(c_xx)
    root = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    left, s, right = np.linalg.svd(w.numpy() @ root)
    expected = left[:, :rank] @ np.diag(s[:rank]) @ right[:rank] @ np.linalg.inv(root)
    np.testing.assert_allclose((u @ v).numpy(), expected, atol=1e-8)
    residual = a - x @ (u @ v).numpy().T - b.numpy()
    full = a - x @ w.numpy().T - (a.mean(0) - w.numpy() @ x.mean(0))
    added = (residual**2).sum(1).mean() - (full**2).sum(1).mean()
    np.testing.assert_allclose(added, (s[rank:] ** 2).sum(), rtol=1e-6, atol=1e-10)
    assert abs(residual.mean(0)).max() < 1e-9  # b re-centres
    if rank == 6:
        np.testing.assert_allclose((u @ v).numpy(), w.numpy(), atol=1e-9)
