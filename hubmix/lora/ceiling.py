"""An upper bound of a matrix's exact top-k energy from a randomized range basis, without its spectrum.

With Q an orthonormal basis (m x q), B = Q^T A and R = A - Q B, in the basis [Q, Q_perp]:

    A A^T = [[B B^T, B C^T], [C B^T, C C^T]],   C = Q_perp^T A,  C^T C = R^T R,  ||C||_2 = ||R||_2

and for every tau > 0 the off-diagonal blocks are bounded in the Loewner order ([y; z] -> ||X^T y/sqrt(tau) -
sqrt(tau) z||^2 >= 0):

    A A^T  <=  diag(B B^T + F F^T / tau,  C C^T + tau I)  <=  diag(B B^T + F F^T / tau,  (rho + tau) I),

with F = B R^T (q x m) and rho >= ||R||_2^2. Eigenvalues are monotone in that order (Weyl), so the exact top-k
energy (the sum of the k largest eigenvalues of A A^T) is at most the sum of the k largest of the union of
eig(B B^T + F F^T / tau) (a q x q problem) and k copies of rho + tau; the bound is the least over a grid of tau.
When power iterations have aligned Q with the top singular space, F is small and the bound is close to the
randomized factors' own kept energy (the top-k of eig(B B^T)): then it certifies them.

rho comes from Lanczos on R^T R (or R R^T, the smaller side) with a Gaussian start, full reorthogonalization:
its largest Ritz value theta never exceeds ||R||_2^2, and by Kuczynski & Wozniakowski (SIAM J. Matrix Anal. Appl.
13(4), 1992) P(theta < (1 - EPS) ||R||_2^2) <= 1.648 sqrt(d) exp(-sqrt(EPS) (2j - 1)) after j steps on a
d x d operator; j is chosen so that this is at most FAILURE, plus one step (whichever way the paper counts the
first product), and rho = theta / (1 - EPS). So the bound holds
with probability at least 1 - FAILURE per layer (over the Lanczos start only; float32 rounding of the products,
~1e-6 relative, is far inside the EPS margin).
"""

from __future__ import annotations

import math

import torch

EPS = 0.25  # safety margin on the Lanczos estimate of ||R||_2^2
FAILURE = 1e-9  # probability, per layer, that rho underestimates ||R||_2^2
TAUS = 48  # grid of tau (log-spaced, relative to rho)


def lanczos_steps(dim: int, eps: float = EPS, failure: float = FAILURE) -> int:
    """Steps j with 1.648 sqrt(dim) exp(-sqrt(eps) (2j - 1)) <= failure (Kuczynski & Wozniakowski's bound), + 1."""
    return max(2, math.ceil((math.log(1.648 * math.sqrt(dim) / failure) / math.sqrt(eps) + 1) / 2)) + 1


def top_eigenvalue(r: torch.Tensor, gen: torch.Generator, steps: int | None = None) -> float:
    """theta: the largest Ritz value of Lanczos on the Gram matrix of `r`'s smaller side (never above ||r||_2^2)."""
    m, n = r.shape
    d = min(m, n)
    apply = (lambda v: r @ (r.T @ v)) if m <= n else (lambda v: r.T @ (r @ v))
    steps = min(d, steps or lanczos_steps(d))
    basis = torch.zeros(steps, d, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    basis[0] = v / v.norm()
    alpha, beta = [], []
    for j in range(steps):
        w = apply(basis[j].to(r.dtype)).double()
        alpha.append(float(w @ basis[j]))
        for _ in range(2):  # full reorthogonalization, twice (Kahan's "twice is enough")
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(w.norm())
        if j + 1 == steps or b <= 1e-12 * max(abs(alpha[0]), 1e-300):
            break  # an invariant subspace: its Ritz values are eigenvalues
        beta.append(b)
        basis[j + 1] = w / b
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if len(alpha) > 1:
        off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return max(0.0, float(torch.linalg.eigvalsh(t)[-1]))


def energy_ceiling(a: torch.Tensor, basis: torch.Tensor, proj: torch.Tensor, k: int, gen: torch.Generator) -> float:
    """An upper bound (with probability >= 1 - FAILURE) of the exact top-k energy of `a`, given an orthonormal
    `basis` (m x q) and `proj` = basis^T a (see the module docstring)."""
    r = a - basis @ proj
    f = proj @ r.T
    h1 = (proj @ proj.T).double()
    ff = (f @ f.T).double()
    rho = top_eigenvalue(r, gen) / (1 - EPS)
    scale = rho if rho > 0 else float(torch.linalg.eigvalsh(h1)[-1]) * 1e-12 + 1e-300
    best = math.inf
    for tau in (scale * torch.logspace(-4, 2, TAUS, dtype=torch.float64)).tolist():
        top = torch.linalg.eigvalsh(h1 + ff / tau)
        pool = torch.cat([top, torch.full((k,), rho + tau, dtype=torch.float64)])
        best = min(best, float(pool.topk(k).values.sum()))
    return best
