"""Truncated SVD of one layer's delta: exact, or randomized (Halko et al.) where it keeps as much energy.

Every randomized factorization is checked against the exact truncated SVD's kept energy (the sum of the top-k
squared singular values): first by a cheap certified upper bound of that energy from the randomized basis itself
(lora.ceiling: a few products and a Lanczos estimate, no spectrum); when the bound cannot certify `tol` (0.5%),
after two more power iterations, by the exact energy from the eigenvalues of the delta's Gram matrix (`eigvalsh`
on its smaller side); only when the randomized factors fall short of that by more than `tol` is the layer
factorized exactly. The same exact spectrum chooses the rank for `--rank auto --energy E`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

OVERSAMPLE = 10  # extra random directions beyond the rank, at least; the rank itself where larger (below)
POWER_ITERATIONS = 2
MORE_ITERATIONS = 2  # when the ceiling cannot certify, but nearly does
NEARLY = 0.97  # kept / ceiling from which more iterations are worth trying before the exact spectrum
EXACT_BELOW = 128  # layers whose smaller side is below this are factorized exactly (no time to gain)
SMALL = 1 << 18  # elements below which a layer's factorization runs on one thread


@dataclass
class Factors:
    u: torch.Tensor  # [m, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, n]
    kept: float  # squared singular values kept (the energy of the rank-k approximation)
    total: float  # squared Frobenius norm of the delta
    exact_kept: float  # the exact truncated SVD's kept energy, or (check "ceiling") a certified upper bound of it
    method: str  # "exact" or "randomized"
    check: str = "exact"  # how a randomized result was accepted: "ceiling" (bound) or "spectrum" (eigvalsh)


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


def oversampled(k: int, m: int, n: int) -> int:
    """Random directions for rank k: k + max(10, k). Twice the rank leaves a gap between the kept singular values
    and the residual's, which the ceiling needs to certify 0.5% on slowly decaying spectra (measured: i^-0.7
    spectra at rank 32 certify with 64 directions, not with 42)."""
    return min(k + max(OVERSAMPLE, k), m, n)


def _truncated(a, rank, method, tol, seed, energies) -> Factors:
    from hubmix.lora.ceiling import energy_ceiling

    m, n = a.shape
    k = min(rank, m, n)
    total = float(a.square().sum())
    small = min(m, n)
    q = oversampled(k, m, n)
    if method == "exact" or small < EXACT_BELOW or q >= small // 2:  # nothing to gain there
        return _exact(a, k, total)
    gen = torch.Generator().manual_seed(seed)
    basis = range_basis(a, q, gen, POWER_ITERATIONS)
    u, s, vh, proj = _project(a, basis, k)
    kept = float(s.double().square().sum())
    if energies is None:  # (--rank auto has the exact spectrum already: no bound needed)
        ceiling = energy_ceiling(a, basis, proj, k, gen)
        if kept < (1 - tol) * ceiling and kept >= NEARLY * ceiling:
            basis = power(a, basis, MORE_ITERATIONS)
            u, s, vh, proj = _project(a, basis, k)
            kept = float(s.double().square().sum())
            ceiling = energy_ceiling(a, basis, proj, k, gen)
        if kept >= (1 - tol) * ceiling:
            return Factors(u, s, vh, kept, total, ceiling, "randomized", "ceiling")
        energies = spectrum(a)
    exact_kept = float(energies[:k].double().sum())
    if kept < (1 - tol) * exact_kept:
        return _exact(a, k, total)
    return Factors(u, s, vh, kept, total, exact_kept, "randomized", "spectrum")


def _exact(a: torch.Tensor, k: int, total: float) -> Factors:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    kept = float(s[:k].square().sum())
    return Factors(u[:, :k], s[:k], vh[:k], kept, total, kept, "exact")


def range_basis(a: torch.Tensor, q: int, gen: torch.Generator, iterations: int) -> torch.Tensor:
    """Randomized range finder: an orthonormal [m, q] basis of a @ omega, refined by power iterations."""
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype)
    return power(a, torch.linalg.qr(a @ omega).Q, iterations)


def power(a: torch.Tensor, basis: torch.Tensor, iterations: int) -> torch.Tensor:
    """Power (subspace) iterations, re-orthonormalized at every product (Halko et al. Algorithm 4.4)."""
    for _ in range(iterations):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    return basis


def _project(a: torch.Tensor, basis: torch.Tensor, k: int):
    """The rank-k SVD of basis @ basis^T a, and basis^T a."""
    proj = basis.T @ a
    ub, s, vh = torch.linalg.svd(proj, full_matrices=False)
    return basis @ ub[:, :k], s[:k], vh[:k], proj


def randomized(a: torch.Tensor, k: int, *, seed: int = 0,
               iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded randomized SVD of rank k (unchecked; `truncated` checks it): the same delta gives the same factors."""
    basis = range_basis(a, oversampled(k, *a.shape), torch.Generator().manual_seed(seed), iterations)
    return _project(a, basis, k)[:3]
