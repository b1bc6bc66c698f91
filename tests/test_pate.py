"""PATE's aggregators and their privacy analysis, checked against formulas written out here.

Expected values are recomputed in this file from the papers' formulas with plain ``math`` (one
query, one order at a time), never by calling the code under test twice. Statistical tests run
on a seeded generator, so they are deterministic; each states the probability that it would fail
for a correct implementation on a fresh seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privacy import pate
from privacy.pate import analysis

#: A test with a seeded generator fails for a correct implementation on a fresh seed with at most
#: this probability (two-sided exact binomial test).
FALSE_FAILURE = 1e-6


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_hot_votes(top: list[int], n_classes: int = 10, n_teachers: int = 250) -> torch.Tensor:
    """Queries where ``n_teachers`` split as ``top[q]`` for class 0 and the rest for class 1."""
    votes = torch.zeros(len(top), n_classes, dtype=torch.long)
    votes[:, 0] = torch.tensor(top)
    votes[:, 1] = n_teachers - votes[:, 0]
    return votes


# -- aggregation ----------------------------------------------------------------------------------
def test_teacher_votes_counts_each_teacher_once() -> None:
    predictions = torch.tensor([[0, 2, 1], [0, 1, 1], [2, 1, 1], [0, 1, 0]])  # 4 teachers, 3 queries
    votes = pate.teacher_votes(predictions, n_classes=3)
    assert votes.tolist() == [[3, 0, 1], [0, 3, 1], [1, 3, 0]]
    assert votes.sum(dim=1).tolist() == [4, 4, 4]


def test_teacher_votes_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="class ids"):
        pate.teacher_votes(torch.tensor([[0, 3]]), n_classes=3)
    with pytest.raises(ValueError, match="class ids"):
        pate.teacher_votes(torch.tensor([[-1, 0]]), n_classes=3)
    with pytest.raises(TypeError):
        pate.teacher_votes(torch.tensor([[0.0, 1.0]]), n_classes=3)


@given(predictions=st.lists(st.lists(st.integers(0, 4), min_size=3, max_size=3), min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_teacher_votes_rows_sum_to_teachers(predictions: list[list[int]]) -> None:
    tensor = torch.tensor(predictions)
    votes = pate.teacher_votes(tensor, n_classes=5)
    assert votes.shape == (3, 5)
    assert votes.sum(dim=1).tolist() == [len(predictions)] * 3
    for q in range(3):
        for c in range(5):
            assert votes[q, c] == sum(row[q] == c for row in predictions)


def _votes_with_unique_plurality(seed: int = 1) -> torch.Tensor:
    g = gen(seed)
    votes = torch.randint(0, 50, (200, 7), generator=g)
    votes[torch.arange(200), torch.randint(0, 7, (200,), generator=g)] += 60  # clear winner
    return votes


def test_tiny_noise_returns_the_plurality() -> None:
    votes = _votes_with_unique_plurality()
    plurality = votes.argmax(dim=1)
    assert torch.equal(pate.gnmax(votes, sigma=1e-6, generator=gen()), plurality)
    assert torch.equal(pate.laplace_noisy_max(votes, gamma=1e6, generator=gen()), plurality)
    labels, answered = pate.confident_gnmax(votes, threshold=0.0, sigma1=1e-6, sigma2=1e-6, generator=gen())
    assert bool(answered.all())
    assert torch.equal(labels, plurality)


def test_same_seed_same_labels_and_global_rng_untouched() -> None:
    votes = one_hot_votes([125, 126, 124, 120, 130] * 40)  # split: noise decides
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for aggregate in (
        lambda g: pate.gnmax(votes, 5.0, g),
        lambda g: pate.laplace_noisy_max(votes, 0.2, g),
        lambda g: pate.confident_gnmax(votes, 120.0, 5.0, 5.0, g)[0],
    ):
        first, again, other = aggregate(gen(7)), aggregate(gen(7)), aggregate(gen(8))
        assert torch.equal(first, again)
        assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state), "the aggregators drew from the global generator"


def test_confident_gnmax_abstains_on_split_and_answers_on_consensus() -> None:
    consensus = [240, 245, 250, 230]
    split = [126, 130, 125, 140]
    votes = one_hot_votes(consensus + split)
    labels, answered = pate.confident_gnmax(votes, threshold=200.0, sigma1=10.0, sigma2=5.0, generator=gen())
    assert answered.dtype == torch.bool
    assert answered.tolist() == [True] * 4 + [False] * 4  # gaps of >= 3 sigma1 either way
    assert labels.tolist() == [0] * 4 + [pate.UNANSWERED] * 4


def _binomial_ok(successes: int, trials: int, p: float) -> bool:
    return stats.binomtest(successes, trials, p).pvalue > FALSE_FAILURE


def test_gnmax_noise_has_standard_deviation_sigma() -> None:
    """Votes (2, 0): the label flips when N(0, s^2) - N(0, s^2) > 2, probability Phi(-2 / (s sqrt 2)).

    With s = 2 that is 0.240; with variance sigma instead of sigma^2 it would be 0.362 -- at 20,000
    queries (sd 0.003) the test tells the two apart by ~40 sd. False-failure rate 1e-6.
    """
    n, sigma = 20_000, 2.0
    votes = torch.tensor([[2, 0]]).repeat(n, 1)
    flips = int((pate.gnmax(votes, sigma, gen(3)) == 1).sum())
    p = 0.5 * math.erfc(2.0 / (2.0 * sigma))  # Phi(-2 / (sigma sqrt 2))
    assert _binomial_ok(flips, n, p), (flips / n, p)
    assert not _binomial_ok(flips, n, 0.5 * math.erfc(2.0 / (2.0 * sigma**2)))


def test_laplace_noise_has_scale_one_over_gamma() -> None:
    """Votes (k, 0) with Lap(1/gamma) each: the flip probability is exactly (2 + gamma k) / (4 e^(gamma k))
    (the two-class case of [P17] Lemma 4). gamma k = 1 gives 0.276; scale gamma instead of 1/gamma
    (gamma = 0.5, k = 2) would give 0.027. False-failure rate 1e-6."""
    n, gamma, k = 20_000, 0.5, 2
    votes = torch.tensor([[k, 0]]).repeat(n, 1)
    flips = int((pate.laplace_noisy_max(votes, gamma, gen(4)) == 1).sum())
    p = (2 + gamma * k) / (4 * math.exp(gamma * k))
    assert _binomial_ok(flips, n, p), (flips / n, p)


def test_threshold_noise_has_standard_deviation_sigma1() -> None:
    """max count 10, threshold 12, sigma1 4: answered with probability Phi(-0.5) = 0.309. 1e-6 rate."""
    n = 20_000
    votes = torch.tensor([[10, 3, 0]]).repeat(n, 1)
    _, answered = pate.confident_gnmax(votes, threshold=12.0, sigma1=4.0, sigma2=1.0, generator=gen(5))
    p = 0.5 * math.erfc(0.5 / math.sqrt(2.0))
    assert _binomial_ok(int(answered.sum()), n, p), (float(answered.float().mean()), p)


def test_aggregators_reject_bad_noise() -> None:
    votes = one_hot_votes([200])
    with pytest.raises(ValueError):
        pate.gnmax(votes, 0.0, gen())
    with pytest.raises(ValueError):
        pate.laplace_noisy_max(votes, -1.0, gen())
    with pytest.raises(ValueError):
        pate.gnmax(votes[0], 1.0, gen())


# -- analysis: per-query quantities ---------------------------------------------------------------
def logq_gaussian_by_hand(counts: list[float], sigma: float) -> float:
    """[P18] Prop. 7: union bound of 0.5 erfc((n_j* - n_j) / (2 sigma)), capped at 1 - 1/n."""
    top = max(range(len(counts)), key=lambda j: counts[j])
    q = sum(0.5 * math.erfc((counts[top] - c) / (2 * sigma)) for j, c in enumerate(counts) if j != top)
    return min(math.log(q), math.log(1 - 1 / len(counts)))


@pytest.mark.parametrize(
    ("counts", "sigma"),
    [([30, 10, 5, 5], 10.0), ([100, 90, 60, 0], 20.0), ([7, 7, 0], 3.0), ([200, 50, 0, 0, 0], 40.0)],
)
def test_logq_gaussian_matches_erfc(counts: list[float], sigma: float) -> None:
    assert analysis.compute_logq_gaussian(np.array(counts), sigma) == pytest.approx(
        logq_gaussian_by_hand(counts, sigma), rel=1e-9
    )
    # many queries at once give the same numbers, from numpy and from torch
    batch = torch.tensor([counts, counts[::-1]])
    expected = [logq_gaussian_by_hand(counts, sigma), logq_gaussian_by_hand(counts[::-1], sigma)]
    np.testing.assert_allclose(analysis.compute_logq_gaussian(batch, sigma), expected, rtol=1e-9)


def test_logq_gaussian_is_finite_far_beyond_erfc_underflow() -> None:
    logq = analysis.compute_logq_gaussian(np.array([1000.0, 0.0]), 1.0)
    # erfc(500) underflows; its log is -x^2 - log(x sqrt(pi)) asymptotically
    assert math.isfinite(logq)
    assert logq == pytest.approx(math.log(0.5) - 500.0**2 - math.log(500.0 * math.sqrt(math.pi)), rel=1e-6)


def test_logq_laplace_matches_lemma_4() -> None:
    counts, gamma = [40, 31, 20, 0], 0.1
    q = sum((2 + gamma * (40 - c)) / (4 * math.exp(gamma * (40 - c))) for c in counts[1:])
    assert analysis.compute_logq_laplace(np.array(counts), gamma) == pytest.approx(math.log(q), rel=1e-12)
    # a tie: the union bound exceeds 1 - 1/n and is capped
    assert analysis.compute_logq_laplace(np.array([5, 5]), gamma) == pytest.approx(math.log(0.5))


def test_logpr_answered_is_the_gaussian_tail() -> None:
    counts, threshold, sigma1 = np.array([[180, 70], [90, 160]]), 150.0, 40.0
    expected = [math.log(0.5 * math.erfc((threshold - m) / (sigma1 * math.sqrt(2)))) for m in (180, 160)]
    np.testing.assert_allclose(
        analysis.compute_logpr_answered(threshold, sigma1, counts), expected, rtol=1e-12
    )


def test_data_independent_curves() -> None:
    orders = np.array([1.5, 2.0, 10.0, 64.0])
    np.testing.assert_allclose(analysis.rdp_data_independent_gaussian(4.0, orders), orders / 16.0)
    np.testing.assert_allclose(analysis.rdp_data_independent_threshold(4.0, orders), orders / 32.0)
    with pytest.raises(ValueError):
        analysis.rdp_data_independent_gaussian(4.0, [1.0])


def theorem_6_by_hand(logq: float, sigma: float, order: float) -> tuple[float, bool]:
    """[P18] Theorem 6 with Prop. 10's mu2 = sigma sqrt(log 1/q), mu1 = mu2 + 1, eps_i = mu_i / sigma^2;
    returns (bound, whether its conditions hold)."""
    q = math.exp(logq)
    mu2 = sigma * math.sqrt(-logq)
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    holds = (
        mu2 > 1
        and order <= mu1
        and q * math.exp(eps2) < 1
        and q <= math.exp((mu2 - 1) * eps2) / (mu1 / (mu1 - 1) * mu2 / (mu2 - 1)) ** mu2
    )
    a = (1 - q) / (1 - (q * math.exp(eps2)) ** ((mu2 - 1) / mu2))
    b = math.exp(eps1) / q ** (1 / (mu1 - 1))
    return math.log((1 - q) * a ** (order - 1) + q * b ** (order - 1)) / (order - 1), holds


def test_data_dependent_gaussian_is_theorem_6() -> None:
    sigma = 40.0
    logq = logq_gaussian_by_hand([240, 10, 0, 0, 0, 0, 0, 0, 0, 0], sigma)
    orders = np.array([2.0, 5.0, 20.0, 50.0])
    got = analysis.rdp_data_dependent_gaussian(logq, sigma, orders)
    for order, value in zip(orders, got, strict=True):
        bound, holds = theorem_6_by_hand(logq, sigma, float(order))
        assert holds, "this case is meant to exercise the data-dependent branch"
        assert bound < order / sigma**2
        assert value == pytest.approx(bound, rel=1e-9)


def test_data_dependent_gaussian_falls_back_when_theorem_6_does_not_apply() -> None:
    sigma = 40.0
    orders = np.array([2.0, 10.0, 100.0, 1000.0])
    # a split vote: q near 1/2, mu2 < 1, so only the data-independent bound holds
    logq = logq_gaussian_by_hand([126, 124], sigma)
    np.testing.assert_allclose(analysis.rdp_data_dependent_gaussian(logq, sigma, orders), orders / sigma**2)
    # consensus, but orders above mu1 are outside the theorem
    logq = logq_gaussian_by_hand([250, 0, 0], sigma)
    mu1 = sigma * math.sqrt(-logq) + 1
    high = np.array([math.ceil(mu1) + 1.0, 10 * mu1])
    np.testing.assert_allclose(analysis.rdp_data_dependent_gaussian(logq, sigma, high), high / sigma**2)
    # a certain outcome is 0-RDP
    np.testing.assert_array_equal(analysis.rdp_data_dependent_gaussian(-math.inf, sigma, orders), 0.0)


def test_data_dependent_threshold_uses_the_less_likely_outcome() -> None:
    sigma1, orders = 50.0, np.array([2.0, 8.0, 30.0])
    for logpr in (math.log(1e-12), math.log1p(-1e-12)):  # almost never / almost always answered
        expected = analysis.rdp_data_dependent_gaussian(math.log(1e-12), math.sqrt(2) * sigma1, orders)
        np.testing.assert_allclose(
            analysis.rdp_data_dependent_threshold(logpr, sigma1, orders), expected, rtol=1e-6
        )
        assert np.all(expected < orders / (2 * sigma1**2))


def theorem_3_by_hand(q: float, gamma: float, moment: float) -> float:
    """[P17] Section 3: min of 2 gamma^2 l (l+1), 2 gamma l, and Theorem 3 where q < 1/(e^(2 gamma) + 1)."""
    eps = 2 * gamma
    best = min(2 * gamma**2 * moment * (moment + 1), eps * moment)
    if q < 1 / (math.exp(eps) + 1):
        best = min(
            best,
            math.log((1 - q) * ((1 - q) / (1 - math.exp(eps) * q)) ** moment + q * math.exp(eps * moment)),
        )
    return best


@pytest.mark.parametrize("counts", [[250, 0, 0], [150, 100, 0], [200, 30, 20], [90, 80, 80]])
def test_laplace_log_moment_is_theorem_3(counts: list[int]) -> None:
    gamma, moments = 0.05, np.arange(1.0, 30.0)
    q = sum((2 + gamma * (counts[0] - c)) / (4 * math.exp(gamma * (counts[0] - c))) for c in counts[1:])
    q = min(q, 1 - 1 / len(counts))
    got = analysis.laplace_log_moment(math.log(q), gamma, moments)
    np.testing.assert_allclose(got, [theorem_3_by_hand(q, gamma, m) for m in moments], rtol=1e-9)


def test_laplace_log_moment_data_dependent_gain_on_consensus() -> None:
    gamma, moments = 0.05, np.arange(1.0, 20.0)
    q = math.exp(analysis.compute_logq_laplace(np.array([250, 0, 0]), gamma))
    got = analysis.laplace_log_moment(math.log(q), gamma, moments)
    assert np.all(got < 2 * gamma**2 * moments * (moments + 1))


# -- analysis: composition and conversion ---------------------------------------------------------
def test_data_independent_composition_is_a_sum() -> None:
    votes = one_hot_votes([250, 130, 200])
    orders = np.array([2.0, 8.0, 32.0])
    np.testing.assert_allclose(
        analysis.gnmax_rdp(votes, 40.0, orders, data_dependent=False), 3 * orders / 1600.0
    )
    answered = torch.tensor([True, False, True])
    np.testing.assert_allclose(
        analysis.confident_gnmax_rdp(
            votes, 200.0, 150.0, 40.0, orders, answered=answered, data_dependent=False
        ),
        3 * orders / (2 * 150.0**2) + 2 * orders / 40.0**2,
    )
    moments = np.array([1.0, 4.0])
    np.testing.assert_allclose(
        analysis.lnmax_log_moments(votes, 0.05, moments, data_dependent=False),
        3 * np.minimum(2 * 0.05**2 * moments * (moments + 1), 0.1 * moments),
    )


def test_data_dependent_composition_sums_per_query_bounds() -> None:
    rows = [[240, 10, 0], [200, 40, 10], [130, 120, 0]]
    sigma, orders = 30.0, np.array([2.0, 6.0, 20.0])
    expected = sum(
        analysis.rdp_data_dependent_gaussian(logq_gaussian_by_hand(row, sigma), sigma, orders) for row in rows
    )
    np.testing.assert_allclose(analysis.gnmax_rdp(np.array(rows), sigma, orders), expected, rtol=1e-9)


def test_unanswered_queries_pay_only_for_the_threshold() -> None:
    votes = one_hot_votes([250, 240, 126, 128])
    orders = analysis.DEFAULT_ORDERS
    kwargs = {"threshold": 200.0, "sigma1": 100.0, "sigma2": 40.0, "orders": orders}
    with_mask = analysis.confident_gnmax_rdp(votes, answered=[True, True, False, False], **kwargs)
    checks_only = analysis.confident_gnmax_rdp(votes, answered=[False] * 4, **kwargs)
    all_answered = analysis.confident_gnmax_rdp(votes, **kwargs)  # no mask: charged as all answered
    np.testing.assert_allclose(with_mask - checks_only, analysis.gnmax_rdp(votes[:2], 40.0, orders))
    assert np.all(all_answered >= with_mask)


def test_classic_conversion_of_one_gaussian_matches_the_closed_form() -> None:
    """Q GNMax queries, data-independent: min_a Q a / s^2 + log(1/delta) / (a - 1) is attained at
    a = 1 + s sqrt(log(1/delta) / Q), giving Q / s^2 + 2 sqrt(Q log(1/delta)) / s ([M17] Prop. 3)."""
    sigma, delta, queries = 40.0, 1e-5, 300
    orders = np.linspace(1.01, 200.0, 40_000)
    rdp = analysis.gnmax_rdp(one_hot_votes([250] * queries), sigma, orders, data_dependent=False)
    eps, order = analysis.rdp_to_epsilon(orders, rdp, delta)
    log_inv = math.log(1 / delta)
    assert eps == pytest.approx(queries / sigma**2 + 2 * math.sqrt(queries * log_inv) / sigma, rel=1e-6)
    assert order == pytest.approx(1 + sigma * math.sqrt(log_inv / queries), abs=0.01)


def test_improved_conversion_formula_and_never_worse() -> None:
    orders = np.array([3.0])
    eps, _ = analysis.rdp_to_epsilon(orders, np.array([0.5]), 1e-5, conversion="improved")
    assert eps == pytest.approx(0.5 + math.log(2 / 3) - (math.log(1e-5) + math.log(3)) / 2)
    orders = analysis.DEFAULT_ORDERS
    for sigma in (5.0, 20.0, 80.0):
        rdp = analysis.gnmax_rdp(one_hot_votes([250, 200, 130]), sigma, orders)
        classic, _ = analysis.rdp_to_epsilon(orders, rdp, 1e-6)
        improved, _ = analysis.rdp_to_epsilon(orders, rdp, 1e-6, conversion="improved")
        assert 0 <= improved < classic
    with pytest.raises(ValueError):
        analysis.rdp_to_epsilon(orders, np.zeros(len(orders)), 1e-5, conversion="pld")  # type: ignore[arg-type]


def test_moments_accountant_tail_bound() -> None:
    """[P17] Theorem 2: eps = min_l (alpha(l) + log(1/delta)) / l."""
    moments = np.arange(1.0, 9.0)
    log_moments = 0.3 * moments * (moments + 1)
    eps, best = analysis.moments_to_epsilon(moments, log_moments, 1e-5)
    by_hand = [(a + math.log(1e5)) / m for m, a in zip(moments, log_moments, strict=True)]
    assert eps == pytest.approx(min(by_hand))
    assert best == moments[int(np.argmin(by_hand))]


# -- analysis: what the numbers must do -----------------------------------------------------------
def mixed_votes(queries: int, seed: int = 0) -> np.ndarray:
    """Mostly consensus, some close calls, 250 teachers over 10 classes."""
    rng = np.random.default_rng(seed)
    agreement = rng.choice([0.98, 0.9, 0.6], size=queries, p=[0.6, 0.3, 0.1])
    return np.stack([rng.multinomial(250, [a] + [(1 - a) / 9] * 9) for a in agreement])


@pytest.mark.parametrize("data_dependent", [True, False])
def test_more_queries_more_epsilon(data_dependent: bool) -> None:
    votes = mixed_votes(400)
    eps = [pate.pate_epsilon(votes[:n], 40.0, 1e-5, data_dependent=data_dependent)[0] for n in (50, 200, 400)]
    assert eps[0] < eps[1] < eps[2]
    eps = [pate.lnmax_epsilon(votes[:n], 0.05, 1e-5, data_dependent=data_dependent)[0] for n in (50, 400)]
    assert eps[0] < eps[1]


def test_more_noise_less_data_independent_epsilon() -> None:
    votes = mixed_votes(400)
    eps = [pate.pate_epsilon(votes, s, 1e-5, data_dependent=False)[0] for s in (20.0, 40.0, 80.0)]
    assert eps[0] > eps[1] > eps[2]
    eps = [pate.lnmax_epsilon(votes, g, 1e-5, data_dependent=False)[0] for g in (0.1, 0.05, 0.02)]
    assert eps[0] > eps[1] > eps[2]


def test_data_dependent_epsilon_can_fall_with_less_noise_on_consensus() -> None:
    """Not monotone in sigma, and that is the point of [P18]: on consensus, less noise makes a wrong
    answer (q) vanishingly unlikely faster than it raises the worst case. So a test of 'more noise,
    less epsilon' must only be written for the data-independent bound."""
    consensus = one_hot_votes([250] * 400)
    low, _ = pate.pate_epsilon(consensus, 20.0, 1e-5)
    high, _ = pate.pate_epsilon(consensus, 40.0, 1e-5)
    assert low < high
    assert low < pate.pate_epsilon(consensus, 40.0, 1e-5, data_dependent=False)[0]


def test_data_dependent_beats_data_independent_on_consensus() -> None:
    consensus = one_hot_votes([250] * 1000)
    dependent, _ = pate.pate_epsilon(consensus, 40.0, 1e-5)
    independent, _ = pate.pate_epsilon(consensus, 40.0, 1e-5, data_dependent=False)
    assert dependent < 0.5 * independent
    dependent, _ = pate.lnmax_epsilon(consensus, 0.05, 1e-5)
    independent, _ = pate.lnmax_epsilon(consensus, 0.05, 1e-5, data_dependent=False)
    assert dependent < 0.5 * independent
    # a split vote gains nothing
    split = one_hot_votes([126] * 100)
    assert pate.pate_epsilon(split, 40.0, 1e-5)[0] == pytest.approx(
        pate.pate_epsilon(split, 40.0, 1e-5, data_dependent=False)[0], rel=1e-12
    )


def test_confident_gnmax_epsilon() -> None:
    votes = torch.as_tensor(mixed_votes(500, seed=1))
    labels, answered = pate.confident_gnmax(
        votes, threshold=200.0, sigma1=100.0, sigma2=40.0, generator=gen()
    )
    assert 0 < int(answered.sum()) < len(votes)
    confident, _ = pate.pate_epsilon(votes, 40.0, 1e-5, threshold=200.0, sigma1=100.0, answered=answered)
    independent, _ = pate.pate_epsilon(
        votes, 40.0, 1e-5, threshold=200.0, sigma1=100.0, answered=answered, data_dependent=False
    )
    # plain GNMax answering every query: dearer in the worst case (not always data-dependently:
    # the checks cost something on every query, consensus answers cost almost nothing)
    everything, _ = pate.pate_epsilon(votes, 40.0, 1e-5, data_dependent=False)
    assert confident <= independent < everything
    with pytest.raises(ValueError, match="together"):
        pate.pate_epsilon(votes, 40.0, 1e-5, threshold=200.0)
    assert labels[~answered].eq(pate.UNANSWERED).all()


def test_torch_and_numpy_votes_agree() -> None:
    votes = mixed_votes(50)
    assert pate.pate_epsilon(votes, 40.0, 1e-5) == pate.pate_epsilon(torch.as_tensor(votes), 40.0, 1e-5)


@given(
    counts=st.lists(st.integers(0, 300), min_size=2, max_size=12),
    sigma=st.floats(0.5, 200.0),
    gamma=st.floats(0.005, 2.0),
)
@settings(max_examples=200, deadline=None)
def test_data_dependent_never_exceeds_data_independent(counts: list[int], sigma: float, gamma: float) -> None:
    orders = analysis.DEFAULT_ORDERS
    c = np.array(counts, dtype=float)
    logq = analysis.compute_logq_gaussian(c, sigma)
    assert logq <= math.log(1 - 1 / len(counts)) + 1e-12
    rdp = analysis.rdp_data_dependent_gaussian(logq, sigma, orders)
    assert np.all(rdp >= 0)
    assert np.all(rdp <= orders / sigma**2 * (1 + 1e-12))
    logpr = analysis.compute_logpr_answered(0.6 * sum(counts), sigma, c)
    threshold = analysis.rdp_data_dependent_threshold(logpr, sigma, orders)
    assert np.all((threshold >= 0) & (threshold <= orders / (2 * sigma**2) * (1 + 1e-12)))
    moments = orders - 1
    log_moments = analysis.laplace_log_moment(analysis.compute_logq_laplace(c, gamma), gamma, moments)
    assert np.all((log_moments >= 0) & (log_moments <= 2 * gamma**2 * moments * (moments + 1) * (1 + 1e-12)))
