"""Differential privacy owned by the data owner: the sanitized release, DP-SGD where the data
is, each owner's ledger on ``dp_accounting``, and the paper's sampling across workers.

Importing it registers the ``dp`` command set (``dp.sgd_step``) and the ``sanitized`` release.
"""

from privacy.dp.ledger import Ledger, Plan, calibrate_sigma
from privacy.dp.release import SANITIZED, Sanitized
from privacy.dp.sgd import COMMAND_SET, GhostModel, dp_sgd_step
from privacy.dp.training import DpHistory, DpSettings, schedule, train_dp

__all__ = [
    "COMMAND_SET",
    "SANITIZED",
    "DpHistory",
    "DpSettings",
    "GhostModel",
    "Ledger",
    "Plan",
    "Sanitized",
    "calibrate_sigma",
    "dp_sgd_step",
    "schedule",
    "train_dp",
]
