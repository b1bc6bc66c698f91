"""PATE: private aggregation of teacher ensembles (Papernot et al. 2017, 2018).

Teachers trained on disjoint private partitions vote on public queries; the student learns only
noisy plurality labels. This package holds the pure parts: :mod:`~privacy.pate.aggregation` (the
votes histogram and the noisy aggregators LNMax, GNMax, Confident-GNMax, each drawing noise only
from the caller's ``torch.Generator``) and :mod:`~privacy.pate.analysis` (their privacy cost: RDP
or log moments per query, data-independent and data-dependent, summed and converted to
(epsilon, delta)). Those two talk to no worker; the two below call them.
A data-dependent epsilon is a function of the private votes and must never be published as is.

:mod:`~privacy.pate.workers` runs PATE where the data is (each owner trains its teachers and is
the noisy aggregator of its own votes, charging its ledger; importing this package registers the
``pate`` command set) and :mod:`~privacy.pate.training` is the leader's half (combine the owners'
noisy labels, train a student).
"""

from privacy.pate import workers
from privacy.pate.aggregation import UNANSWERED, confident_gnmax, gnmax, laplace_noisy_max, teacher_votes
from privacy.pate.analysis import (
    DEFAULT_MOMENTS,
    DEFAULT_ORDERS,
    compute_logpr_answered,
    compute_logq_gaussian,
    compute_logq_laplace,
    confident_gnmax_rdp,
    gnmax_rdp,
    laplace_log_moment,
    lnmax_epsilon,
    lnmax_log_moments,
    moments_to_epsilon,
    pate_epsilon,
    rdp_data_dependent_gaussian,
    rdp_data_dependent_threshold,
    rdp_data_independent_gaussian,
    rdp_data_independent_threshold,
    rdp_to_epsilon,
)

__all__ = [
    # aggregation
    "UNANSWERED",
    "confident_gnmax",
    "gnmax",
    "laplace_noisy_max",
    "teacher_votes",
    # analysis: per query
    "DEFAULT_MOMENTS",
    "DEFAULT_ORDERS",
    "compute_logpr_answered",
    "compute_logq_gaussian",
    "compute_logq_laplace",
    "laplace_log_moment",
    "rdp_data_dependent_gaussian",
    "rdp_data_dependent_threshold",
    "rdp_data_independent_gaussian",
    "rdp_data_independent_threshold",
    # analysis: summed and converted
    "confident_gnmax_rdp",
    "gnmax_rdp",
    "lnmax_log_moments",
    "lnmax_epsilon",
    "moments_to_epsilon",
    "pate_epsilon",
    "rdp_to_epsilon",
]

from privacy.pate.training import TeacherSettings, combine, pate_labels, train_student
from privacy.pate.workers import owner_epsilon

__all__ += ["TeacherSettings", "combine", "owner_epsilon", "pate_labels", "train_student", "workers"]
