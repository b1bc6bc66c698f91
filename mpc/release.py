"""The *shares* release: a data owner lets its data be secret-shared among named parties.

``worker.publish("boston/x", x, releases=[Shares(to=["alice", "bob"])])`` lets anything derived
from the dataset travel in form :data:`SHARE` (a share, or a masked opening computed from
shares) to ``alice`` and ``bob``, and to nobody else. Only the worker-side code of :mod:`mpc`
turns data into that form (:func:`mpc.sharing.share_from`, where the data lives); every
protocol message between parties then carries the form, and each party's worker enforces the
audience it came with. So shares move only among the named parties, and a value reconstructed
from them reaches only an identity among them (or the owner).

**What it reveals.** An identity in ``to`` that can gather every share can reconstruct
anything shared, the input itself included: naming the leader in ``to`` so that it may read
results lets it read the data too. Name only the parties when nothing but shares may leave
(results are then reconstructed by the owner, or by parties that are trusted with them). The
parties are semi-honest and must not collude, and the crypto provider must not collude with
any of them: with its material one party could unmask the others' openings.
"""

from __future__ import annotations

from collections.abc import Iterable

from actors.policy import Release, release_kind

#: Form of a share of private data, of anything computed from shares, and of masked openings.
SHARE = "share"


@release_kind
class Shares(Release):
    """Shares of the data may go to the identities in ``to`` (the parties; required)."""

    kind = "shares"
    forms = frozenset({SHARE})

    def __init__(self, to: Iterable[str] | None = None) -> None:
        if to is None:
            raise ValueError("Shares names its parties (to=[...]): shares sent to anyone would be the data")
        super().__init__(to)
