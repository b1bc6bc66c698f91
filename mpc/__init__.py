"""Secure multi-party computation (SPDZ): fixed-point encoding, additive sharing, the crypto
provider and the protocols, one file each.

Importing :mod:`mpc` registers the ``mpc`` command set (what parties serve) and the ``provider``
set (what a crypto provider serves). It builds on :mod:`actors` and :mod:`protocol` only.
"""

from mpc import beaver, conv, fixed, provider, sharing, sigmoid, spdz2k, training, truncation
from mpc.fixed import FixedPrecisionTensor, fix_precision, float_precision
from mpc.nn import ApproxSigmoid, SharedModule, share_module
from mpc.provider import COMMAND_SET, PROVIDER_SET
from mpc.release import SHARE, Shares
from mpc.ring import PRECISION, decode, encode
from mpc.tensor import Cost, Meter, Recording, SharedTensor, cat, meter, prepare, recording, share

__all__ = [
    "ApproxSigmoid",
    "FixedPrecisionTensor",
    "fix_precision",
    "float_precision",
    "Meter",
    "SharedModule",
    "cat",
    "meter",
    "Recording",
    "recording",
    "share_module",
    "COMMAND_SET",
    "PRECISION",
    "PROVIDER_SET",
    "Cost",
    "SharedTensor",
    "beaver",
    "conv",
    "fixed",
    "decode",
    "encode",
    "prepare",
    "provider",
    "share",
    "sharing",
    "Shares",
    "SHARE",
    "sigmoid",
    "spdz2k",
    "training",
    "truncation",
]
