"""The *sanitized* release: what a sanitizer computes from the data may leave, nothing else.

``worker.publish("boston/x", x, releases=[Sanitized(epsilon=2.0, delta=1e-5)])`` declares that
parameters changed by differentially private steps on the dataset (per-example clipping and
Gaussian noise, :mod:`privacy.dp.sgd`) and PATE's noisy labels (:mod:`privacy.pate.workers`)
may leave the worker, each use charged to the owner's ledger (:mod:`privacy.dp.ledger`) before its
result exists, until the budget ``(epsilon, delta)`` is spent. Ordinary model updates, losses
and everything else derived from the data stay raw and stay put. ``ledger`` is a file the owner
keeps the ledger in, so that a restart forgets nothing; ``accountant`` is what the budget is kept
with: RDP by default (milliseconds per check, and the moments accountant the paper used), or PLD
(tighter by about 10%, a few hundred ms the first time each plan is checked).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from actors.policy import Release, release_kind
from privacy.dp.ledger import ACCOUNTANTS

#: Form of what a DP-SGD step computed from the data: noisy, clipped, charged to a budget.
SANITIZED = "sanitized"


@release_kind
class Sanitized(Release):
    """Values computed from the data by a sanitizer (DP-SGD) may leave, within the budget."""

    kind = "sanitized"
    forms = frozenset({SANITIZED})

    def __init__(
        self,
        to: Iterable[str] | None = None,
        *,
        epsilon: float = 1.0,
        delta: float = 1e-5,
        ledger: str | Path | None = None,
        accountant: str = "rdp",
    ) -> None:
        super().__init__(to)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
        self.accountant = accountant
        if not epsilon > 0 or not 0 < delta < 1:
            raise ValueError(f"a budget is epsilon > 0 and 0 < delta < 1, got ({epsilon}, {delta})")
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.ledger = Path(ledger) if ledger is not None else None

    def __repr__(self) -> str:
        return (
            f"Sanitized(epsilon={self.epsilon:g}, delta={self.delta:g}, accountant={self.accountant}, "
            f"to={self.to or 'anyone'})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sanitized) and _key(other) == _key(self)

    def __hash__(self) -> int:
        return hash((Sanitized, *_key(self)))


def _key(release: Sanitized) -> tuple[object, ...]:
    return (release.to, release.epsilon, release.delta, release.ledger, release.accountant)
