"""PATE's noisy aggregation of teacher votes: the only place teacher labels become student labels.

Teachers trained on disjoint private partitions each predict a class for every public query; the
student only ever sees the argmax of the vote histogram after noise. Three aggregators:

* :func:`laplace_noisy_max` (LNMax, Papernot et al. 2017 "Semi-supervised knowledge transfer for
  deep learning from private training data", Eq. 1);
* :func:`gnmax` (GNMax, Papernot et al. 2018 "Scalable private learning with PATE", Section 4.1);
* :func:`confident_gnmax` (Confident-GNMax, 2018 paper Algorithm 1): answer only queries the
  teachers agree on, which is what makes the data-dependent analysis pay off.

Every function here is pure: votes in, labels out. The noise comes from the caller's
``torch.Generator`` and this module must never draw from torch's global generator or seed one
itself -- in production the caller seeds it from a secure source, in tests from a constant. This
module never computes privacy costs (that is :mod:`privacy.pate.analysis`) and never returns the
noiseless argmax or the votes themselves: that would release the teachers' data with no privacy.
"""

from __future__ import annotations

import torch

__all__ = ["UNANSWERED", "confident_gnmax", "gnmax", "laplace_noisy_max", "teacher_votes"]

#: The label :func:`confident_gnmax` gives a query it declined to answer.
UNANSWERED = -1


def _check_votes(votes: torch.Tensor) -> None:
    if votes.dim() != 2 or votes.shape[1] < 1:
        raise ValueError(f"votes must be [n_queries, n_classes], got shape {tuple(votes.shape)}")


def _noise_like(votes: torch.Tensor, generator: torch.Generator, kind: str, scale: float) -> torch.Tensor:
    """Noise of ``votes``' shape in float64, drawn from ``generator`` on its own device.

    Laplace noise is the difference of two unit exponentials (an exact identity), because torch's
    Laplace distribution cannot take a generator and inverting a uniform hits log(0) at its edge.
    """
    shape = tuple(votes.shape)
    options = {"dtype": torch.float64, "device": generator.device}
    if kind == "gaussian":
        noise = torch.randn(shape, generator=generator, **options)
    else:
        first = torch.empty(shape, **options).exponential_(generator=generator)
        second = torch.empty(shape, **options).exponential_(generator=generator)
        noise = first - second
    return (noise * scale).to(votes.device)


def teacher_votes(predictions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The vote histogram: ``votes[q, c]`` is how many teachers predicted class ``c`` for query ``q``.

    ``predictions`` is ``[n_teachers, n_queries]`` of class ids. Returns ``[n_queries, n_classes]``
    int64 counts; each row sums to ``n_teachers``. The histogram is what the analysis reasons
    about: one teacher (one data partition) changing its vote moves two counts by one.
    """
    if predictions.dim() != 2:
        raise ValueError(f"predictions must be [n_teachers, n_queries], got {tuple(predictions.shape)}")
    if n_classes < 1:
        raise ValueError("n_classes must be at least 1")
    if predictions.dtype.is_floating_point or predictions.dtype == torch.bool:
        raise TypeError(f"predictions must be integer class ids, got {predictions.dtype}")
    predictions = predictions.long()
    if predictions.numel() and (int(predictions.min()) < 0 or int(predictions.max()) >= n_classes):
        raise ValueError(f"class ids must lie in [0, {n_classes})")
    n_queries = predictions.shape[1]
    votes = torch.zeros(n_queries, n_classes, dtype=torch.long, device=predictions.device)
    votes.scatter_add_(1, predictions.T, torch.ones_like(predictions.T))
    return votes


def laplace_noisy_max(votes: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """LNMax: ``argmax_j (n_j + Lap(1 / gamma))`` per query (2017 paper, Eq. 1).

    Each query is then (2 gamma, 0)-DP: one teacher moves two counts by one each. Smaller
    ``gamma`` is more noise and more privacy. Returns ``[n_queries]`` int64 labels.
    """
    _check_votes(votes)
    if not gamma > 0:
        raise ValueError("gamma must be positive")
    noisy = votes.to(torch.float64) + _noise_like(votes, generator, "laplace", 1.0 / gamma)
    return noisy.argmax(dim=1)


def gnmax(votes: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """GNMax: ``argmax_j (n_j + N(0, sigma^2))`` per query (2018 paper, Section 4.1).

    Gaussian rather than Laplace noise because its Renyi-DP composes better over thousands of
    queries and its tails are light, so consensus queries are almost never flipped -- which the
    data-dependent analysis rewards. Returns ``[n_queries]`` int64 labels.
    """
    _check_votes(votes)
    if not sigma > 0:
        raise ValueError("sigma must be positive")
    noisy = votes.to(torch.float64) + _noise_like(votes, generator, "gaussian", sigma)
    return noisy.argmax(dim=1)


def confident_gnmax(
    votes: torch.Tensor, threshold: float, sigma1: float, sigma2: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident-GNMax (2018 paper, Algorithm 1): answer a query only if the teachers agree.

    A query is answered when ``max_j n_j + N(0, sigma1^2) >= threshold``; answered queries get a
    GNMax label with ``sigma2``, the others get ``-1``. The threshold check is itself a Gaussian
    mechanism on the max count (sensitivity 1) and costs privacy for every query, answered or not;
    GNMax costs only on answered ones. Returns ``(labels, answered)``: int64 labels with -1 for
    unanswered queries and the bool mask of answered ones (the analysis needs the mask).

    The threshold noise for all queries is drawn first, then the GNMax noise for the answered ones
    in query order, so a seeded generator reproduces both.
    """
    _check_votes(votes)
    if not (sigma1 > 0 and sigma2 > 0):
        raise ValueError("sigma1 and sigma2 must be positive")
    top = votes.to(torch.float64).max(dim=1).values
    noisy_top = top + _noise_like(top.unsqueeze(1), generator, "gaussian", sigma1).squeeze(1)
    answered = noisy_top >= threshold
    labels = torch.full((votes.shape[0],), UNANSWERED, dtype=torch.long, device=votes.device)
    if bool(answered.any()):
        labels[answered] = gnmax(votes[answered], sigma2, generator)
    return labels, answered
