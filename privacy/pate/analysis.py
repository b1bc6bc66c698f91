"""The privacy cost of PATE's aggregators: how much epsilon a set of answered queries spent.

Papers and where each bound comes from (numbers refer to the arXiv versions):

* [P17] Papernot, Abadi, Erlingsson, Goodfellow, Talwar, "Semi-supervised knowledge transfer for
  deep learning from private training data", ICLR 2017 (arXiv:1610.05755): LNMax and its
  moments-accountant analysis (Theorems 2 and 3, Lemma 4).
* [P18] Papernot, Song, Mironov, Raghunathan, Talwar, Erlingsson, "Scalable private learning with
  PATE", ICLR 2018 (arXiv:1802.08908): GNMax and Confident-GNMax, analysed with Renyi DP
  (Propositions 7 and 8, Theorem 6 and Proposition 10 for the data-dependent bound).
* [M17] Mironov, "Renyi differential privacy", CSF 2017: RDP composes by addition (Prop. 1), the
  Gaussian mechanism's RDP (Corollary 3) and the classic RDP -> (eps, delta) conversion (Prop. 3).
* [B20] Balle, Barthe, Gaboardi, Hsu, Sato, "Hypothesis testing interpretations and Renyi
  differential privacy", AISTATS 2020 (Theorem 21): the improved conversion.

The research code that accompanied [P17] and [P18] (tensorflow/privacy, ``research/pate_2017``
and ``research/pate_2018/core.py``) is the reference these functions were checked against; they
were written here from the papers' formulas. Like that code, the default conversion is the classic
one; ``conversion="improved"`` gives [B20], which is always at least as tight.

Conventions: every cost is an RDP curve over ``orders`` (numpy float64 arrays), summed over
queries, and converted once at the end. LNMax is analysed, as in [P17], with log moments
``alpha(l)`` of the privacy loss; they are the same thing as RDP at order ``l + 1``:
``alpha(l) = l * rdp(l + 1)``.

What this module must never do:

* **Publish a data-dependent epsilon as it is.** It is a function of the private votes, so it
  leaks; [P18] Section 4.2 / Appendix C release it only after adding noise scaled to its smooth
  sensitivity, which is NOT implemented here. A data-dependent number from this module is for the
  data owners' own bookkeeping and for deciding whether to stop; publish the data-independent one.
* Draw randomness or touch the network: these are pure functions of votes and parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import special

__all__ = [
    "DEFAULT_MOMENTS",
    "DEFAULT_ORDERS",
    # GNMax [P18]
    "compute_logq_gaussian",
    "rdp_data_independent_gaussian",
    "rdp_data_dependent_gaussian",
    # the threshold step of Confident-GNMax [P18]
    "compute_logpr_answered",
    "rdp_data_independent_threshold",
    "rdp_data_dependent_threshold",
    # LNMax [P17]
    "compute_logq_laplace",
    "laplace_log_moment",
    # summed over queries
    "gnmax_rdp",
    "confident_gnmax_rdp",
    "lnmax_log_moments",
    # to (eps, delta)
    "rdp_to_epsilon",
    "moments_to_epsilon",
    "pate_epsilon",
    "lnmax_epsilon",
]

Floats = NDArray[np.float64]
Conversion = Literal["classic", "improved"]

#: Renyi orders: dense near 1 (large sigma, many queries), integers up to 100, then sparse up to
#: 1000 (strong consensus, where the data-dependent bound wants high orders).
DEFAULT_ORDERS: Floats = np.unique(
    np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11.0, 101.0), np.geomspace(100.0, 1000.0, 41)])
)
DEFAULT_ORDERS.setflags(write=False)
#: Moments ``l`` for the [P17] accountant (its code used 1..8; more cost nothing and help consensus).
DEFAULT_MOMENTS: Floats = np.arange(1.0, 101.0)
DEFAULT_MOMENTS.setflags(write=False)


# -- helpers ----------------------------------------------------------------------------------------
def _counts(votes: ArrayLike | torch.Tensor) -> Floats:
    """Votes as a float64 ``[n_queries, n_classes]`` array (one query may be given as a row)."""
    if isinstance(votes, torch.Tensor):
        votes = votes.detach().cpu().numpy()
    counts = np.atleast_2d(np.asarray(votes, dtype=np.float64))
    if counts.ndim != 2 or counts.shape[1] < 1:
        raise ValueError(f"votes must be [n_queries, n_classes], got shape {counts.shape}")
    return counts


def _orders(orders: ArrayLike | None) -> Floats:
    result = DEFAULT_ORDERS if orders is None else np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if result.ndim != 1 or result.size == 0 or np.any(result <= 1):
        raise ValueError("orders must be a non-empty list of numbers > 1 (RDP is undefined at 1)")
    return result


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive and finite, got {value}")


def _log1mexp(x: Floats) -> Floats:
    """``log(1 - exp(x))`` for ``x <= 0`` without cancellation (two branches, Maechler 2012)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < -math.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def _cap(logq: Floats, n_classes: int) -> Floats:
    """Noisy argmax with i.i.d. noise returns the true argmax at least as often as any other class,
    so with probability >= 1/n: ``q <= 1 - 1/n`` holds even where the union bound exceeds it."""
    with np.errstate(divide="ignore"):
        return np.minimum(logq, math.log1p(-1.0 / n_classes) if n_classes > 1 else -np.inf)


def _others(counts: Floats) -> tuple[Floats, NDArray[np.bool_]]:
    """Each count's gap below its row's (first) maximum, and a mask hiding the maximum itself."""
    top = counts.argmax(axis=1)
    gaps = counts[np.arange(len(counts)), top][:, None] - counts
    others = np.ones_like(counts, dtype=bool)
    others[np.arange(len(counts)), top] = False
    return gaps, others


def _squeeze(value: Floats, single: bool) -> Floats | float:
    return float(value[0]) if single else value


# -- GNMax [P18] ------------------------------------------------------------------------------------
def compute_logq_gaussian(counts: ArrayLike | torch.Tensor, sigma: float) -> Floats | float:
    """Upper bound on ``log Pr[GNMax's answer != the true plurality]``, per query ([P18] Prop. 7).

    Class ``j`` beats the plurality ``j*`` only if ``N(0, sigma^2) - N(0, sigma^2) > n_j* - n_j``;
    the difference of two noises is ``N(0, 2 sigma^2)``, so that has probability
    ``0.5 erfc((n_j* - n_j) / (2 sigma))``; the union bound sums it over ``j != j*``. The exact
    multivariate probability is tighter but [P18] (and its code) use the union bound because the
    smooth-sensitivity analysis is built on it. Computed in log space (``log_ndtr``) so that large
    gaps give a finite ``logq`` rather than ``log(0)``.

    ``counts``: one query's counts (returns a float) or ``[n_queries, n_classes]`` (an array).
    """
    _positive(sigma=sigma)
    single = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts).ndim == 1
    c = _counts(counts)
    gaps, others = _others(c)
    log_sf = np.where(others, special.log_ndtr(-gaps / (math.sqrt(2.0) * sigma)), -np.inf)
    with np.errstate(divide="ignore"):
        logq = special.logsumexp(log_sf, axis=1)
    return _squeeze(_cap(logq, c.shape[1]), single)


def rdp_data_independent_gaussian(sigma: float, orders: ArrayLike | None = None) -> Floats:
    """RDP of one GNMax query at every order: ``alpha / sigma^2`` ([P18] Prop. 8).

    GNMax is post-processing of the Gaussian mechanism on the histogram, whose L2 sensitivity is
    sqrt(2) (one teacher moves two counts by one), and the Gaussian mechanism's RDP is
    ``alpha * Delta^2 / (2 sigma^2)`` ([M17] Corollary 3).
    """
    _positive(sigma=sigma)
    return _orders(orders) / sigma**2


def rdp_data_dependent_gaussian(logq: ArrayLike, sigma: float, orders: ArrayLike | None = None) -> Floats:
    """Data-dependent RDP of GNMax given ``logq >= log Pr[answer != plurality]`` ([P18] Theorem 6).

    Theorem 6: if a mechanism is (mu1, eps1)- and (mu2, eps2)-RDP and its likely outcome has
    ``Pr[other outcome] <= q``, then for every order ``lambda <= mu1``

        rdp(lambda) <= log((1 - q) A^(lambda - 1) + q B^(lambda - 1)) / (lambda - 1),
        A = (1 - q) / (1 - (q e^eps2)^((mu2 - 1) / mu2)),    B = e^eps1 / q^(1 / (mu1 - 1)),

    provided ``q <= e^((mu2 - 1) eps2) / (mu1 / (mu1 - 1) * mu2 / (mu2 - 1))^mu2`` (the bound
    increases with ``q`` up to there, which is what lets an *upper bound* on q stand in for q) and
    ``q e^eps2 < 1`` (so A is positive). For GNMax ``eps_i = mu_i / sigma^2`` (Prop. 8), and
    [P18] Prop. 10 picks ``mu2 = sigma sqrt(log(1/q))``, ``mu1 = mu2 + 1``. Where a condition fails
    (or the order exceeds mu1) the data-independent bound stands; the result is the minimum of the
    two, so it is never above ``alpha / sigma^2``. A query whose outcome is certain (``q = 0``) is
    0-RDP.

    ``logq``: a scalar (returns ``[n_orders]``) or an array (returns ``logq.shape + (n_orders,)``).
    """
    _positive(sigma=sigma)
    alphas = _orders(orders)
    lq = np.asarray(logq, dtype=np.float64)
    if np.any(lq > 0) or np.any(np.isnan(lq)):
        raise ValueError("logq must be a log-probability (<= 0)")
    lq_col = lq[..., None]
    variance = sigma**2
    independent = np.broadcast_to(alphas / variance, lq_col.shape[:-1] + alphas.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mu2 = np.sqrt(variance * -lq_col)
        mu1 = mu2 + 1.0
        eps1, eps2 = mu1 / variance, mu2 / variance
        increasing = lq_col <= (mu2 - 1.0) * eps2 - mu2 * (
            np.log1p(1.0 / (mu1 - 1.0)) + np.log1p(1.0 / (mu2 - 1.0))
        )
        applies = (mu2 > 1.0) & increasing & (-lq_col > eps2) & (alphas <= mu1)
        log1q = _log1mexp(lq_col)
        log_a = (alphas - 1.0) * (log1q - _log1mexp((lq_col + eps2) * (1.0 - 1.0 / mu2)))
        log_b = (alphas - 1.0) * (eps1 - lq_col / (mu1 - 1.0))
        dependent = np.logaddexp(log1q + log_a, lq_col + log_b) / (alphas - 1.0)
        result = np.where(applies, np.minimum(independent, dependent), independent)
    result = np.where(np.isneginf(lq_col), 0.0, result)
    assert np.all(result >= 0) and np.all(np.isfinite(result)), "RDP bound must be finite and >= 0"
    return result


# -- the threshold step of Confident-GNMax [P18] ----------------------------------------------------
def compute_logpr_answered(
    threshold: float, sigma1: float, counts: ArrayLike | torch.Tensor
) -> Floats | float:
    """``log Pr[max_j n_j + N(0, sigma1^2) >= threshold]``: how likely Algorithm 1 of [P18] answers.

    Exact (no union bound): the check is a single Gaussian draw, ``Phi((max - threshold) / sigma1)``.
    Returns a float for one query's counts, an array for ``[n_queries, n_classes]``.
    """
    _positive(sigma1=sigma1)
    single = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts).ndim == 1
    top = _counts(counts).max(axis=1)
    return _squeeze(special.log_ndtr((top - threshold) / sigma1), single)


def rdp_data_independent_threshold(sigma1: float, orders: ArrayLike | None = None) -> Floats:
    """RDP of one threshold check at every order: ``alpha / (2 sigma1^2)`` ([P18] Section 4.2).

    The check is the Gaussian mechanism on ``max_j n_j``, whose sensitivity is 1 (one teacher moves
    the max by at most one), so [M17] Corollary 3 gives ``alpha * 1^2 / (2 sigma1^2)`` -- half of
    GNMax's ``alpha / sigma^2`` at the same sigma, because GNMax's histogram has sensitivity sqrt(2).
    """
    _positive(sigma1=sigma1)
    return _orders(orders) / (2.0 * sigma1**2)


def rdp_data_dependent_threshold(
    logpr_answered: ArrayLike, sigma1: float, orders: ArrayLike | None = None
) -> Floats:
    """Data-dependent RDP of the threshold check, given ``log Pr[answered]`` ([P18] Theorem 6).

    The check has two outcomes; the likely one is whichever of answer/abstain is more probable, so
    ``q = min(Pr[answered], 1 - Pr[answered])``. Theorem 6 applies with the check's own RDP curve
    ``alpha / (2 sigma1^2)``, which is GNMax's ``alpha / s^2`` at ``s = sqrt(2) sigma1``; hence
    :func:`rdp_data_dependent_gaussian` at that ``s`` (as in [P18]'s code).
    """
    _positive(sigma1=sigma1)
    logpr = np.asarray(logpr_answered, dtype=np.float64)
    logq = np.minimum(logpr, _log1mexp(logpr))
    return rdp_data_dependent_gaussian(logq, math.sqrt(2.0) * sigma1, orders)


# -- LNMax [P17] ------------------------------------------------------------------------------------
def compute_logq_laplace(counts: ArrayLike | torch.Tensor, gamma: float) -> Floats | float:
    """Upper bound on ``log Pr[LNMax's answer != the true plurality]`` ([P17] Lemma 4).

    With ``Lap(1/gamma)`` on each count, class ``j`` beats ``j*`` with probability exactly
    ``(2 + gamma d) / (4 exp(gamma d))`` where ``d = n_j* - n_j`` (the tail of a difference of two
    Laplace variables); the union bound sums it over ``j != j*``. Capped at ``log(1 - 1/n)``.
    """
    _positive(gamma=gamma)
    single = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts).ndim == 1
    c = _counts(counts)
    gaps, others = _others(c)
    t = gamma * gaps
    terms = np.where(others, np.log(2.0 + t) - math.log(4.0) - t, -np.inf)
    with np.errstate(divide="ignore"):
        logq = special.logsumexp(terms, axis=1)
    return _squeeze(_cap(logq, c.shape[1]), single)


def laplace_log_moment(logq: ArrayLike, gamma: float, moments: ArrayLike | None = None) -> Floats:
    """Bound on the log moment ``alpha(l)`` of one LNMax query's privacy loss ([P17] Section 3.1).

    Each LNMax query is (2 gamma, 0)-DP; write ``eps = 2 gamma``. Three bounds, take the least:

    * ``eps^2 l (l + 1) / 2 = 2 gamma^2 l (l + 1)``: the data-independent bound for any eps-DP
      mechanism that [P17] uses (from concentrated DP, Dwork-Rothblum / Bun-Steinke);
    * ``eps l``: the privacy loss of an eps-DP mechanism never exceeds eps;
    * [P17] Theorem 3, data-dependent, when ``q < (e^eps - 1) / (e^(2 eps) - 1) = 1 / (e^eps + 1)``:
      ``log((1 - q) ((1 - q) / (1 - e^eps q))^l + q e^(eps l))``, with ``q`` from Lemma 4
      (:func:`compute_logq_laplace`). The bound increases with ``q`` in that range, so an upper
      bound on ``q`` may stand in for it.

    ``logq``: scalar (returns ``[n_moments]``) or array (returns ``logq.shape + (n_moments,)``).
    """
    _positive(gamma=gamma)
    ls = DEFAULT_MOMENTS if moments is None else np.atleast_1d(np.asarray(moments, dtype=np.float64))
    if ls.ndim != 1 or ls.size == 0 or np.any(ls <= 0):
        raise ValueError("moments must be a non-empty list of positive numbers")
    lq = np.asarray(logq, dtype=np.float64)[..., None]
    if np.any(lq > 0) or np.any(np.isnan(lq)):
        raise ValueError("logq must be a log-probability (<= 0)")
    eps = 2.0 * gamma
    independent = np.minimum(0.5 * eps**2 * ls * (ls + 1.0), eps * ls)
    independent = np.broadcast_to(independent, lq.shape[:-1] + ls.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        applies = lq < -np.logaddexp(0.0, eps)  # q < 1 / (e^eps + 1)
        log1q = _log1mexp(lq)
        first = log1q + ls * (log1q - _log1mexp(eps + lq))
        second = lq + eps * ls
        dependent = np.logaddexp(first, second)
        result = np.where(applies, np.minimum(independent, dependent), independent)
    assert np.all(result >= 0) and np.all(np.isfinite(result)), "log moment bound must be finite and >= 0"
    return result


# -- summed over queries ----------------------------------------------------------------------------
def gnmax_rdp(
    votes: ArrayLike | torch.Tensor,
    sigma: float,
    orders: ArrayLike | None = None,
    *,
    data_dependent: bool = True,
) -> Floats:
    """Total RDP of answering every row of ``votes`` with GNMax: per-query bounds summed ([M17] Prop. 1).

    Data-dependent: each query's Theorem 6 bound at its own ``q`` (Prop. 7); otherwise
    ``n_queries * alpha / sigma^2``. Returns ``[n_orders]``.
    """
    c = _counts(votes)
    alphas = _orders(orders)
    if not data_dependent:
        return len(c) * rdp_data_independent_gaussian(sigma, alphas)
    logq = np.atleast_1d(compute_logq_gaussian(c, sigma))
    return rdp_data_dependent_gaussian(logq, sigma, alphas).sum(axis=0)


def confident_gnmax_rdp(
    votes: ArrayLike | torch.Tensor,
    threshold: float,
    sigma1: float,
    sigma2: float,
    orders: ArrayLike | None = None,
    *,
    answered: ArrayLike | torch.Tensor | None = None,
    data_dependent: bool = True,
) -> Floats:
    """Total RDP of Confident-GNMax over the rows of ``votes`` ([P18] Algorithm 1, Section 4.2).

    Every query pays for the threshold check; only answered queries pay for GNMax (whether GNMax
    runs is decided by the check's output, so adaptive composition covers it). ``answered`` is the
    mask :func:`~privacy.pate.aggregation.confident_gnmax` returned; without it every query is
    charged as answered, which over-counts but is never too low. Returns ``[n_orders]``.
    """
    c = _counts(votes)
    alphas = _orders(orders)
    if answered is None:
        mask = np.ones(len(c), dtype=bool)
    else:
        if isinstance(answered, torch.Tensor):
            answered = answered.detach().cpu().numpy()
        mask = np.asarray(answered, dtype=bool)
        if mask.shape != (len(c),):
            raise ValueError(f"answered must have shape ({len(c)},), got {mask.shape}")
    if data_dependent:
        logpr = np.atleast_1d(compute_logpr_answered(threshold, sigma1, c))
        check = rdp_data_dependent_threshold(logpr, sigma1, alphas).sum(axis=0)
    else:
        check = len(c) * rdp_data_independent_threshold(sigma1, alphas)
    if not mask.any():
        return check
    return check + gnmax_rdp(c[mask], sigma2, alphas, data_dependent=data_dependent)


def lnmax_log_moments(
    votes: ArrayLike | torch.Tensor,
    gamma: float,
    moments: ArrayLike | None = None,
    *,
    data_dependent: bool = True,
) -> Floats:
    """Total log moments of answering every row of ``votes`` with LNMax ([P17] Theorem 2.1:
    log moments compose by addition, the moments accountant of Abadi et al. 2016). ``[n_moments]``."""
    c = _counts(votes)
    # Data-independent is q = 1: Theorem 3 never applies, leaving the two independent bounds.
    logq = np.atleast_1d(compute_logq_laplace(c, gamma)) if data_dependent else np.zeros(len(c))
    return laplace_log_moment(logq, gamma, moments).sum(axis=0)


# -- to (eps, delta) --------------------------------------------------------------------------------
def rdp_to_epsilon(
    orders: ArrayLike, rdp: ArrayLike, delta: float, *, conversion: Conversion = "classic"
) -> tuple[float, float]:
    """Smallest epsilon over the orders for which an RDP curve gives (epsilon, delta)-DP.

    * ``"classic"`` ([M17] Prop. 3, what [P18]'s code uses): ``eps = rdp(a) + log(1/delta) / (a - 1)``.
      It is also the moments accountant's tail bound with ``l = a - 1``.
    * ``"improved"`` ([B20] Theorem 21, what today's maintained accountants use):
      ``eps = rdp(a) + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1)``; never larger than classic
      at the same order (it subtracts ``log(a)/(a-1) - log(1 - 1/a) > 0``), clipped at 0.

    Returns ``(epsilon, order)``.
    """
    alphas = _orders(orders)
    values = np.asarray(rdp, dtype=np.float64)
    if values.shape != alphas.shape:
        raise ValueError(f"rdp has shape {values.shape}, orders {alphas.shape}")
    if not 0 < delta < 1:
        raise ValueError("delta must lie in (0, 1)")
    if np.any(values < 0) or np.any(np.isnan(values)):
        raise ValueError("rdp must be >= 0")
    if conversion == "classic":
        eps = values + math.log(1.0 / delta) / (alphas - 1.0)
    elif conversion == "improved":
        eps = values + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    else:
        raise ValueError(f"unknown conversion {conversion!r}: 'classic' or 'improved'")
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


def moments_to_epsilon(moments: ArrayLike, log_moments: ArrayLike, delta: float) -> tuple[float, float]:
    """The moments accountant's tail bound ([P17] Theorem 2.2, Abadi et al. 2016 Theorem 2):
    ``delta = min_l exp(alpha(l) - l eps)``, i.e. ``eps = min_l (alpha(l) + log(1/delta)) / l``.

    This is :func:`rdp_to_epsilon`'s classic conversion at order ``l + 1`` with RDP ``alpha(l)/l``,
    and is computed that way. Returns ``(epsilon, l)``.
    """
    ls = np.atleast_1d(np.asarray(moments, dtype=np.float64))
    alpha = np.asarray(log_moments, dtype=np.float64)
    if ls.shape != alpha.shape or np.any(ls <= 0):
        raise ValueError("moments must be positive and match log_moments in shape")
    eps, order = rdp_to_epsilon(ls + 1.0, alpha / ls, delta)
    return eps, order - 1.0


def pate_epsilon(
    votes: ArrayLike | torch.Tensor,
    sigma: float,
    delta: float,
    orders: ArrayLike | None = None,
    *,
    data_dependent: bool = True,
    threshold: float | None = None,
    sigma1: float | None = None,
    answered: ArrayLike | torch.Tensor | None = None,
    conversion: Conversion = "classic",
) -> tuple[float, float]:
    """(epsilon, best order) of GNMax -- or Confident-GNMax when ``threshold`` is given -- at ``delta``.

    ``sigma`` is GNMax's noise (sigma2 of Algorithm 1); ``threshold`` and ``sigma1`` are the check's,
    and ``answered`` its outcome mask (see :func:`confident_gnmax_rdp`). A data-dependent epsilon
    must not be published as is (see the module docstring).
    """
    if (threshold is None) != (sigma1 is None):
        raise ValueError("threshold and sigma1 go together (Confident-GNMax) or not at all (GNMax)")
    alphas = _orders(orders)
    if threshold is None or sigma1 is None:
        if answered is not None:
            raise ValueError("answered is only meaningful with a threshold")
        rdp = gnmax_rdp(votes, sigma, alphas, data_dependent=data_dependent)
    else:
        rdp = confident_gnmax_rdp(
            votes, threshold, sigma1, sigma, alphas, answered=answered, data_dependent=data_dependent
        )
    return rdp_to_epsilon(alphas, rdp, delta, conversion=conversion)


def lnmax_epsilon(
    votes: ArrayLike | torch.Tensor,
    gamma: float,
    delta: float,
    moments: ArrayLike | None = None,
    *,
    data_dependent: bool = True,
) -> tuple[float, float]:
    """(epsilon, best moment l) of LNMax over the rows of ``votes`` at ``delta``, as in [P17]."""
    ls = DEFAULT_MOMENTS if moments is None else np.atleast_1d(np.asarray(moments, dtype=np.float64))
    total = lnmax_log_moments(votes, gamma, ls, data_dependent=data_dependent)
    return moments_to_epsilon(ls, total, delta)
