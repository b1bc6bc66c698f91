"""Secure multi-party computation (SPDZ): fixed-point encoding, additive sharing, the crypto
provider and the protocols, one file each.

Importing :mod:`mpc` registers the ``mpc`` command set (what parties serve) and the ``provider``
set (what a crypto provider serves). It builds on :mod:`actors` and :mod:`protocol` only.
"""

from mpc import beaver, conv, provider, sigmoid, truncation
from mpc.provider import COMMAND_SET, PROVIDER_SET
from mpc.ring import PRECISION, decode, encode
from mpc.tensor import Cost, SharedTensor, prepare, share

__all__ = [
    "COMMAND_SET",
    "PRECISION",
    "PROVIDER_SET",
    "Cost",
    "SharedTensor",
    "beaver",
    "conv",
    "decode",
    "encode",
    "prepare",
    "provider",
    "share",
    "sigmoid",
    "truncation",
]
