"""The authenticated (actively secure) mode: SPDZ2k with k = s = 64.

Values of Z_2^64 and their MACs are shared modulo 2^128 (:mod:`mpc.wide`); the provider deals
the MAC key's shares and authenticated material; products, truncations and outputs carry MACs;
and a batched MAC check (coefficients from a committed coin toss, commit-then-open of each
party's check value) runs before any value is revealed. A party that changes a share, an
opening, a MAC or its material is caught with probability at least ``1 - 2^-58`` per check
(:data:`~mpc.spdz2k.protocols.SECURITY_BITS`), and the run aborts with a
:class:`~protocol.CheatingDetected` naming the check. The provider is trusted, as in the
semi-honest mode. Files: :mod:`.shares` (what a party holds, local operations), :mod:`.material`
(the provider), :mod:`.protocols` (products, truncation, inputs, the check, outputs),
:mod:`.tensor` (the leader's side).
"""

from mpc.spdz2k import material, protocols, shares
from mpc.spdz2k.protocols import SECURITY_BITS
from mpc.spdz2k.tensor import AuthenticatedTensor, Session, share

__all__ = ["SECURITY_BITS", "AuthenticatedTensor", "Session", "material", "protocols", "share", "shares"]
