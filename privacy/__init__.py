"""Privacy: federated learning now; differential privacy (the DP-SGD sanitizer, the moments
accountant, sampling and PATE) arrives with the DP issue.

Importing :mod:`privacy` registers its worker commands and label rules (:mod:`privacy.federated`).
It builds on :mod:`actors` and :mod:`protocol` only.
"""

from privacy import federated

__all__ = ["federated"]
