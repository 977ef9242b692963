"""Orthonormal Hadamard matrices of the sizes hidden states have (LinearPatch rotates the stream with one).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. Orders built here: Sylvester's doublings, Paley's
two constructions from a prime q (order q + 1 for q = 3 mod 4, order 2 (q + 1) for q = 1 mod 4), and Kronecker
products of those. That covers the hidden sizes of the supported families (576 = 8 x 72, 896 = 32 x 28,
3584 = 128 x 28, 5120 = 256 x 20, every power of two); other orders are refused, never approximated.
"""

from __future__ import annotations

import functools

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i mod q), chi the quadratic character of the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(q: int) -> torch.Tensor:
    """Paley's Hadamard matrix from the prime q: order q + 1 (q = 3 mod 4) or 2 (q + 1) (q = 1 mod 4)."""
    jac = _jacobsthal(q)
    ones = torch.ones(1, q, dtype=torch.float64)
    if q % 4 == 3:  # I + S, S skew-symmetric with the Jacobsthal matrix inside
        s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1), torch.cat([-ones.T, jac], 1)])
        return torch.eye(q + 1, dtype=torch.float64) + s
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones], 1), torch.cat([ones.T, jac], 1)])
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _paley_prime(m: int) -> int | None:
    """The prime q whose Paley construction has order m, if any."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1
    return None


@functools.cache
def _hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and (half := _hadamard(n // 2)) is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    for m in range(4, n + 1, 4):  # Hadamard orders above 2 are multiples of 4
        q = _paley_prime(m)
        if n % m == 0 and q is not None and (rest := _hadamard(n // m)) is not None:
            return torch.kron(_paley(q), rest)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n (entries +-1 / sqrt(n), float64); ValueError if none is built."""
    h = _hadamard(n)
    if h is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} is built here (Sylvester, Paley I / II and their Kronecker products): "
            "LinearPatch's rotation needs one of the hidden size"
        )
    return h / n**0.5
