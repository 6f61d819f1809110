"""Truncated SVD of one layer's delta: exact, or randomized (Halko et al.) where it keeps as much energy.

The randomized factorization is checked on every layer against the exact top-k energy, which the eigenvalues of
the delta's Gram matrix on its smaller side give without any singular vectors (one matmul and `eigvalsh`, several
times cheaper than a full SVD): when its kept energy falls short of the exact one by more than `tol` (0.5%), the
layer is factorized exactly. The same spectrum chooses the rank for `--rank auto --energy E`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

OVERSAMPLE = 10  # extra random directions beyond the rank
POWER_ITERATIONS = 2
EXACT_BELOW = 128  # layers whose smaller side is below this are factorized exactly (no time to gain)
SMALL = 1 << 18  # elements below which a layer's factorization runs on one thread


@dataclass
class Factors:
    u: torch.Tensor  # [m, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, n]
    kept: float  # squared singular values kept (the energy of the rank-k approximation)
    total: float  # squared Frobenius norm of the delta
    exact_kept: float  # the exact truncated SVD's kept energy
    method: str  # "exact" or "randomized"


def spectrum(a: torch.Tensor) -> torch.Tensor:
    """The squared singular values of `a`, descending, from the Gram matrix of its smaller side (float64 sums of
    float32 products are not needed: energies are compared at 0.5%, far above float32's rounding)."""
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(g).flip(0).clamp_(min=0)


def rank_for_energy(energies: torch.Tensor, share: float, cap: int) -> int:
    """The smallest k whose top-k squared singular values hold `share` of their sum, at most `cap`."""
    total = float(energies.sum())
    if total == 0:
        return 0
    cum = torch.cumsum(energies.double(), 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype)).item()) + 1
    return max(1, min(k, cap, energies.numel()))


def truncated(a: torch.Tensor, rank: int, *, method: str = "auto", tol: float = 0.005, seed: int = 0,
              energies: torch.Tensor | None = None) -> Factors:
    """The rank-`rank` truncated SVD of the float32 matrix `a`. method: auto (randomized where the check passes),
    exact, randomized (still checked)."""
    with threads_for(a.numel()):
        return _truncated(a, rank, method, tol, seed, energies)


@contextmanager
def threads_for(numel: int):
    """Small matrices on one thread: LAPACK's threading costs 10x more than the work on them (measured on a
    busy 2-core machine: 32x288 SVD 37 ms on 2 threads, 2.6 ms on 1)."""
    if numel >= SMALL:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _truncated(a, rank, method, tol, seed, energies) -> Factors:
    m, n = a.shape
    k = min(rank, m, n)
    total = float(a.square().sum())
    small = min(m, n)
    if method == "exact" or small < EXACT_BELOW or k + OVERSAMPLE >= small // 2:  # nothing to gain there
        return _exact(a, k, total)
    energies = spectrum(a) if energies is None else energies
    exact_kept = float(energies[:k].sum())
    u, s, vh = randomized(a, k, seed=seed)
    kept = float(s.square().sum())
    if kept < (1 - tol) * exact_kept:
        return _exact(a, k, total)
    return Factors(u, s, vh, kept, total, exact_kept, "randomized")


def _exact(a: torch.Tensor, k: int, total: float) -> Factors:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    kept = float(s[:k].square().sum())
    return Factors(u[:, :k], s[:k], vh[:k], kept, total, kept, "exact")


def randomized(a: torch.Tensor, k: int, *, seed: int = 0,
               iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder with power iterations (re-orthonormalized), then the SVD of the small projection.
    Seeded, so the same delta gives the same factors."""
    m, n = a.shape
    q = min(k + OVERSAMPLE, m, n)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ ub[:, :k]), s[:k], vh[:k]
