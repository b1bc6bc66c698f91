"""Privacy: federated learning (:mod:`privacy.federated`) and differential privacy owned by the
data owner (:mod:`privacy.dp`: the sanitized release, DP-SGD where the data is, per-owner ledgers;
:mod:`privacy.pate`: noisy aggregation of teachers' votes and its analysis).

Importing :mod:`privacy` registers its worker commands and label rules.
It builds on :mod:`actors` and :mod:`protocol` only.
"""

from privacy import dp, federated

__all__ = ["dp", "federated"]
