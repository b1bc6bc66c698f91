"""Each data owner's privacy ledger: the DP events its data took part in, and its budget.

A ledger is a list of events in the vocabulary of Google's ``dp_accounting`` (the maintained
successor of the moments accountant the paper used): every lot a worker served is a
Poisson-subsampled Gaussian at that step's sampling rate and noise multiplier, every PATE query
a bare Gaussian or Laplace mechanism (:mod:`privacy.pate.workers`). Nothing here
computes a privacy bound by hand: epsilon is the library's.

* **By default the budget uses the RDP accountant** (Renyi DP; with the classic conversion this
  is the moments accountant of Abadi et al.). It is the analysis the paper's numbers come from,
  it takes milliseconds, and it never underestimates. An owner may keep its budget with the
  privacy-loss-distribution accountant instead (``accountant="pld"``): just as sound, about 10%
  lower on the same lots here, a few hundred ms the first time each plan is checked.
  ``epsilon(accountant=...)`` reports either figure whatever the budget uses.
* **Charging is before releasing.** ``charge(plan)`` refuses (``BudgetExhausted``, naming the
  budget and what is left) when one more lot of that plan would exceed the budget, and records
  the lot otherwise, on disk first when the ledger has a file (written to a temporary file and
  renamed over the old one: a crash leaves the old ledger or the new, never half of one).
* The number of lots a plan may still take is found once per plan by bisection on the library's
  epsilon, so a charge costs a comparison, not an accounting.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import BudgetExhausted

if TYPE_CHECKING:
    import dp_accounting


@functools.cache
def _dp() -> Any:
    """``dp_accounting``, imported on first use: it brings scipy and takes about 0.75 s, which
    every worker process would otherwise pay at start whether or not it keeps a budget."""
    import dp_accounting  # noqa: PLC0415 - see above

    return dp_accounting


class _NotConverged(logging.Filter):
    """The RDP accountant warns, once per order and per evaluation, when its series for a
    fractional order near 1 does not converge at a large sampling rate, and then leaves that
    order out. Leaving an order out can only raise epsilon (it is a minimum over orders), so
    nothing is unsafe; a budget check bisects over dozens of evaluations, and the warnings would
    bury every other log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_NotConverged())


#: The noise a plan may add: Gaussian (DP-SGD, GNMax) or Laplace (PATE's LNMax).
MECHANISMS = ("gaussian", "laplace")


@dataclass(frozen=True)
class Plan:
    """One use of the data: Poisson sampling at ``rate`` (1.0: every record takes part), then
    noise of ``sigma`` times the sensitivity -- a DP-SGD lot, or one PATE query.

    ``sigma`` is the library's noise multiplier: the Gaussian's standard deviation over the L2
    sensitivity, or the Laplace scale over the L1 sensitivity (``mechanism="laplace"``, whose
    epsilon is ``1 / sigma``).
    """

    rate: float
    sigma: float
    mechanism: str = "gaussian"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {self.mechanism!r}: one of {', '.join(MECHANISMS)}")

    def event(self) -> dp_accounting.DpEvent:
        noise: dp_accounting.DpEvent = (
            _dp().GaussianDpEvent(self.sigma)
            if self.mechanism == "gaussian"
            else _dp().LaplaceDpEvent(self.sigma)
        )
        # Without subsampling the bare event: the same RDP for a Gaussian, and the only form the
        # RDP accountant knows for a Laplace mechanism.
        return noise if self.rate == 1.0 else _dp().PoissonSampledDpEvent(self.rate, noise)

    def describe(self) -> str:
        noise = (
            f"noise {self.sigma:g}" if self.mechanism == "gaussian" else f"{self.mechanism} {self.sigma:g}"
        )
        return f"rate {self.rate:.4g}, {noise}"


#: The accountants a budget may be kept with: RDP (the default) and PLD (tighter, slower).
ACCOUNTANTS = ("rdp", "pld")


class Ledger:
    """The lots one dataset served, against its owner's budget ``(epsilon, delta)``, kept with
    ``accountant``: both are the library's and sound; PLD gives the same lots a lower epsilon
    (about 10% here), so a budget kept with it admits a little less noise per lot, at a few
    hundred ms per new plan instead of milliseconds."""

    def __init__(
        self, source: str, epsilon: float, delta: float, path: Path | None = None, accountant: str = "rdp"
    ) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
        self.source = source
        self.budget = (epsilon, delta)
        self.accountant = accountant
        self.path = path
        #: Lots served, per plan, in the order plans first appeared.
        self.lots: dict[Plan, int] = {}
        self._room: dict[Plan, int] = {}  # lots each plan may still take (for the ledger as it is)
        if path is not None and path.exists():
            self._load(path)

    # -- what was spent -------------------------------------------------------------------------
    def event(self) -> dp_accounting.DpEvent:
        return _dp().ComposedDpEvent(
            [_dp().SelfComposedDpEvent(plan.event(), count) for plan, count in self.lots.items()]
        )

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """The epsilon spent so far at ``delta`` (the budget's by default), by ``accountant``
        (the budget's by default)."""
        delta = self.budget[1] if delta is None else delta
        return _epsilon(self.event(), delta, accountant or self.accountant)

    def remaining(self, plan: Plan) -> int:
        """How many more lots of ``plan`` fit in the budget."""
        room = self._room.get(plan)
        if room is None:
            room = self._room[plan] = self._fit(plan)
        return room

    # -- spending --------------------------------------------------------------------------------
    def charge(self, plan: Plan, count: int = 1) -> None:
        """Record ``count`` lots of ``plan`` (all or none), or refuse if they would exceed the budget."""
        if count < 1:
            raise ValueError(f"a charge is at least one lot, got {count}")
        room = self.remaining(plan)
        if room < count:
            epsilon, delta = self.budget
            what = "one more lot" if count == 1 else f"{count} more lots"
            raise BudgetExhausted(
                f"{self.source}: {what} ({plan.describe()}) would exceed "
                f"its budget (epsilon {epsilon:g}, delta {delta:g}); spent {self.epsilon():.4f} "
                f"in {sum(self.lots.values())} lots, {room} of this plan left"
            )
        self.lots[plan] = self.lots.get(plan, 0) + count
        for other in list(self._room):  # another plan's room shrinks too: find it again when asked
            if other != plan:
                del self._room[other]
        self._room[plan] -= count
        if self.path is not None:
            self._save(self.path)

    def fits(self, charges: Sequence[tuple[Plan, int]]) -> bool:
        """Whether the ledger with ``charges`` added (lots of several plans) stays in the budget."""
        epsilon, delta = self.budget
        extra = [_dp().SelfComposedDpEvent(plan.event(), n) for plan, n in charges if n > 0]
        return _epsilon(_dp().ComposedDpEvent([self.event(), *extra]), delta, self.accountant) <= epsilon

    def check(self, charges: Sequence[tuple[Plan, int]]) -> None:
        """Refuse (``BudgetExhausted``) unless all of ``charges`` fit together; record nothing.

        One plan is checked against its cached room (a comparison); several plans, which no
        single room describes, by one accounting of them all together."""
        charges = [(plan, n) for plan, n in charges if n > 0]
        if len(charges) == 1 and self.remaining(charges[0][0]) >= charges[0][1]:
            return
        if len(charges) != 1 and self.fits(charges):
            return
        epsilon, delta = self.budget
        asked = "; ".join(f"{n} x ({plan.describe()})" for plan, n in charges)
        raise BudgetExhausted(
            f"{self.source}: {asked} would exceed its budget (epsilon {epsilon:g}, delta {delta:g}); "
            f"spent {self.epsilon():.4f} in {sum(self.lots.values())} lots"
        )

    def charge_all(self, charges: Sequence[tuple[Plan, int]]) -> None:
        """Record lots of several plans as one charge: all of them, or (over budget) none."""
        charges = [(plan, n) for plan, n in charges if n > 0]
        self.check(charges)
        for plan, n in charges:
            self.lots[plan] = self.lots.get(plan, 0) + n
        self._room.clear()  # every plan's room changed
        if self.path is not None:
            self._save(self.path)

    def _fit(self, plan: Plan) -> int:
        """The largest n with epsilon(ledger + n lots of plan) within the budget."""
        return self.largest(lambda n: [(plan, n)])

    def largest(self, charges_for: Callable[[int], Sequence[tuple[Plan, int]]], limit: int = 1 << 40) -> int:
        """The largest n (at most ``limit``) whose ``charges_for(n)`` still fit, by bisection on the
        library's epsilon: how many lots of a plan, or queries of a mechanism, a budget pays for."""

        def fits(n: int) -> bool:
            return self.fits(charges_for(n))

        if limit < 1 or not fits(1):
            return 0
        low, high = 1, 2
        while high <= limit and fits(high):
            low, high = high, high * 2
        high = min(high, limit + 1)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    # -- on disk ---------------------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        record = {
            "source": self.source,
            "budget": list(self.budget),
            "accountant": self.accountant,
            "lots": [[plan.rate, plan.sigma, count, plan.mechanism] for plan, count in self.lots.items()],
        }
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w") as file:
            json.dump(record, file)
        os.replace(temporary, path)

    def _load(self, path: Path) -> None:
        record = json.loads(path.read_text())
        if record.get("source") != self.source:
            raise ValueError(f"{path} is the ledger of {record.get('source')!r}, not {self.source!r}")
        for entry in record["lots"]:  # [rate, sigma, count] before plans named their mechanism
            rate, sigma, count, *rest = entry
            mechanism = str(rest[0]) if rest else "gaussian"
            self.lots[Plan(float(rate), float(sigma), mechanism)] = int(count)


def _epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str) -> float:
    if accountant == "rdp":
        counter: dp_accounting.PrivacyAccountant = _dp().rdp.RdpAccountant()
    elif accountant == "pld":
        counter = _dp().pld.PLDAccountant()
    else:
        raise ValueError(f"unknown accountant {accountant!r}: rdp or pld")
    counter.compose(event)
    value = counter.get_epsilon(delta)
    return math.inf if math.isnan(value) else float(value)  # unknown is spent: a budget refuses


def calibrate_sigma(
    rate: float,
    steps: int,
    epsilon: float,
    delta: float,
    *,
    tolerance: float = 0.01,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (to ``tolerance``) whose ``steps`` lots at ``rate`` stay
    within ``(epsilon, delta)`` under ``accountant`` (the one the owner's budget is kept with):
    the library's calibration, which never returns a value over the target (checked again here)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
    sigma = _dp().calibrate_dp_mechanism(
        _dp().rdp.RdpAccountant if accountant == "rdp" else _dp().pld.PLDAccountant,
        lambda s: _dp().SelfComposedDpEvent(Plan(rate, s).event(), steps),
        epsilon,
        delta,
        tol=tolerance,
    )
    spent = _epsilon(_dp().SelfComposedDpEvent(Plan(rate, sigma).event(), steps), delta, accountant)
    if spent > epsilon:  # the library's contract; a violation would be a privacy bug, not noise
        raise RuntimeError(f"calibration returned sigma {sigma} spending {spent} > {epsilon}")
    return float(sigma)
