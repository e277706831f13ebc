"""CMA-ES, the gradient-free optimiser LoRAHub searches its weights with (lorahub.py).

The covariance matrix adaptation evolution strategy (Hansen & Ostermeier, 2001), as
summarised, with its default constants, in Hansen, "The CMA Evolution Strategy: A
Tutorial", 2016, arXiv:1604.00772 (section "Algorithm Summary"). For f: Rⁿ -> R, one
generation g samples λ candidates around the mean m with step size σ and covariance C:

    z_k ~ N(0, I),   y_k = B D z_k ~ N(0, C),   x_k = m + σ y_k          (C = B D² Bᵀ)

ranks them by f and updates, with the μ best and their weights w_i (Σ w_i = 1):

    y_w = Σ_{i≤μ} w_i y_{i:λ},                 m ← m + σ y_w            (c_m = 1)
    p_σ ← (1 − c_σ) p_σ + √(c_σ (2 − c_σ) μ_eff) C^{-1/2} y_w          (CSA: the step size)
    σ   ← σ · exp((c_σ / d_σ) (‖p_σ‖ / E‖N(0, I)‖ − 1))
    p_c ← (1 − c_c) p_c + h_σ √(c_c (2 − c_c) μ_eff) y_w
    C   ← (1 + c_1 δ(h_σ) − c_1 − c_μ) C + c_1 p_c p_cᵀ                (rank-one)
          + c_μ Σ_{i≤μ} w_i y_{i:λ} y_{i:λ}ᵀ                            (rank-μ)

with h_σ = 1 unless ‖p_σ‖ / √(1 − (1 − c_σ)^{2(g+1)}) ≥ (1.4 + 2/(n+1)) E‖N(0, I)‖
(p_c stalls while σ is growing fast) and δ(h_σ) = (1 − h_σ) c_c (2 − c_c). The constants
are the tutorial's defaults with positive weights only: λ = 4 + ⌊3 ln n⌋, μ = ⌊λ/2⌋,
w_i ∝ ln((λ+1)/2) − ln i, μ_eff = 1 / Σ w_i², and c_σ, d_σ, c_c, c_1, c_μ as in __init__.

Box constraints [lower, upper]: a candidate outside the box is redrawn (up to
``RESAMPLES`` times) and, if still outside, clipped onto it, so f is never called
outside the box. The update then uses the step that was really evaluated,
y_k = (x_k − m) / σ; since m moves to a convex combination of evaluated points it
stays in the box too. The start x0 is evaluated first (it counts against the budget),
and the result is the best point evaluated. Randomness comes from one numpy
Generator only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RESAMPLES = 20  # redraws of an out-of-box candidate before it is clipped


@dataclass
class EsResult:
    x: np.ndarray  # the best point evaluated
    fx: float  # f(x)
    evaluations: list = field(default_factory=list)  # every (x, f(x)) in the order evaluated


class CMAES:
    """Ask / tell CMA-ES in n dimensions (n = len(x0)) inside the box [lower, upper]."""

    def __init__(self, x0, sigma0: float, rng: np.random.Generator, lower=-np.inf, upper=np.inf,
                 popsize: int | None = None):
        self.mean = np.asarray(x0, dtype=np.float64).copy()
        n = self.n = self.mean.size
        self.lower, self.upper = np.broadcast_to(lower, n).astype(float), np.broadcast_to(upper, n).astype(float)
        inside = np.all(self.mean >= self.lower) and np.all(self.mean <= self.upper)
        if not (np.all(self.lower < self.upper) and inside):
            raise ValueError(f"x0 {self.mean} must lie in the box [{lower}, {upper}] (with lower < upper)")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0!r}")
        self.sigma, self.rng = float(sigma0), rng
        self.lam = popsize or 4 + int(3 * math.log(n))
        self.mu = self.lam // 2
        raw = math.log((self.lam + 1) / 2) - np.log(np.arange(1, self.mu + 1))
        self.weights = raw / raw.sum()
        self.mu_eff = 1.0 / np.sum(self.weights ** 2)
        me = self.mu_eff
        self.c_sigma = (me + 2) / (n + me + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((me - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_c = (4 + me / n) / (n + 4 + 2 * me / n)
        self.c_1 = 2 / ((n + 1.3) ** 2 + me)
        self.c_mu = min(1 - self.c_1, 2 * (me - 2 + 1 / me) / ((n + 2) ** 2 + me))
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))  # E‖N(0, I)‖
        self.p_sigma, self.p_c = np.zeros(n), np.zeros(n)
        self.C, self.B, self.D = np.eye(n), np.eye(n), np.ones(n)
        self.generation = 0

    def ask(self) -> np.ndarray:
        """λ candidates, (λ, n), every one inside the box."""
        xs = np.empty((self.lam, self.n))
        for k in range(self.lam):
            for _ in range(RESAMPLES):
                x = self.mean + self.sigma * (self.B @ (self.D * self.rng.standard_normal(self.n)))
                if np.all(x >= self.lower) and np.all(x <= self.upper):
                    break
            xs[k] = np.clip(x, self.lower, self.upper)
        return xs

    def tell(self, xs: np.ndarray, fs) -> None:
        """Update m, σ, C from the evaluated candidates ``xs`` (λ, n) and their values ``fs``."""
        n, g = self.n, self.generation
        ys = (xs - self.mean) / self.sigma  # the steps really taken (clipping included)
        best = ys[np.argsort(fs, kind="stable")[:self.mu]]  # (μ, n), best first
        y_w = self.weights @ best
        self.mean = self.mean + self.sigma * y_w
        inv_sqrt_C_y = self.B @ ((self.B.T @ y_w) / self.D)  # C^{-1/2} y_w
        self.p_sigma = (1 - self.c_sigma) * self.p_sigma + math.sqrt(
            self.c_sigma * (2 - self.c_sigma) * self.mu_eff) * inv_sqrt_C_y
        norm = np.linalg.norm(self.p_sigma)
        h_sigma = float(norm / math.sqrt(1 - (1 - self.c_sigma) ** (2 * (g + 1))) < (1.4 + 2 / (n + 1)) * self.chi_n)
        self.p_c = (1 - self.c_c) * self.p_c + h_sigma * math.sqrt(self.c_c * (2 - self.c_c) * self.mu_eff) * y_w
        delta_h = (1 - h_sigma) * self.c_c * (2 - self.c_c)
        rank_one = np.outer(self.p_c, self.p_c)
        rank_mu = (best * self.weights[:, None]).T @ best  # Σ w_i y_i y_iᵀ
        self.C = (1 + self.c_1 * delta_h - self.c_1 - self.c_mu) * self.C + self.c_1 * rank_one + self.c_mu * rank_mu
        self.sigma *= math.exp((self.c_sigma / self.d_sigma) * (norm / self.chi_n - 1))
        self.C = (self.C + self.C.T) / 2  # keep it exactly symmetric before the eigendecomposition
        eigenvalues, self.B = np.linalg.eigh(self.C)
        self.D = np.sqrt(np.maximum(eigenvalues, 1e-30))
        self.generation += 1


def minimize(f, x0, sigma0: float, budget: int, rng: np.random.Generator, lower=-np.inf, upper=np.inf,
             popsize: int | None = None, callback=None) -> EsResult:
    """Minimise ``f`` with at most ``budget`` evaluations (x0 first); ``callback(i, x, fx)`` after each."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    es = CMAES(x0, sigma0, rng, lower, upper, popsize)
    result = EsResult(es.mean.copy(), math.inf)

    def evaluate(x):
        fx = float(f(x.copy()))
        result.evaluations.append((x.copy(), fx))
        if fx < result.fx:
            result.x, result.fx = x.copy(), fx
        if callback is not None:
            callback(len(result.evaluations), x, fx)
        return fx

    evaluate(es.mean)
    while len(result.evaluations) < budget:
        xs = es.ask()
        room = budget - len(result.evaluations)
        fs = [evaluate(x) for x in xs[:room]]
        if len(fs) < es.lam:
            break  # the budget ends inside a generation: no update from a partial population
        es.tell(xs, fs)
    return result
