"""Who may see what: labels on objects, the releases data owners declare, and the one Policy.

Every object a worker holds has an owner (the identity that made it, or the worker itself for
its published data) and a label: the set of :class:`Taint` s saying whose private data flowed
into it and in what form. Labels flow through computation as values do (a result carries the
union of its arguments' labels, an in-place write adds to its target's), and the worker's
:class:`Policy` answers every get, move, forward, delete, overwrite and use of an object by
the same rules on every transport. A labelled object leaves only through a release its data
owner declared when publishing (information-flow control with declassification at named
points); releases are plug-ins (:func:`release_kind`), so ``privacy/`` and ``mpc/`` add their
own without editing this file.

This module never lets a taint disappear except where a release explicitly declassifies it, and
it never trusts a label a sender claims to *remove* restrictions: labels that arrive can only add.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

from actors.log import get_logger
from protocol import PermissionDenied

#: Forms in which private data reaches an object. Releases name the forms they let leave.
RAW = "raw"  #: the data itself, or anything computed from it by ordinary operations
SHAPE = "shape"  #: even the shape is private (a count of nonzeros, of uniques, ...)
GRADIENT = "gradient"  #: gradients of a scalar computed from the data (written by backward)
UPDATE = "update"  #: parameters changed by optimizer steps on gradients, and training losses


class Taint(NamedTuple):
    """One source of private data in an object's label.

    ``source`` is ``"<owner id>/<dataset>"``. On the owner's worker ``audience`` is ``None`` and
    the owner's declared releases decide; once released to another worker, the taint carries
    the identities it may still go to, so that worker enforces the owner's rule without knowing
    it (a taint released to anyone is dropped instead: there is nothing left to enforce).
    """

    source: str
    form: str
    audience: tuple[str, ...] | None = None

    @property
    def owner(self) -> str:
        return self.source.partition("/")[0]


Label = frozenset[Taint]
EMPTY: Label = frozenset()


def label_to_wire(label: Label) -> list[Any] | None:
    if not label:
        return None
    return [[t.source, t.form, None if t.audience is None else list(t.audience)] for t in label]


def label_from_wire(raw: Any) -> Label:
    """A label as a peer sent it. Malformed entries are refused: a label that cannot be read
    cannot be enforced, and an object with an unenforceable label must not be stored."""
    if raw is None:
        return EMPTY
    if not isinstance(raw, list):
        raise PermissionDenied("a label is a list of [source, form, audience] entries")
    taints = []
    for entry in raw:
        if not (isinstance(entry, list | tuple) and len(entry) == 3):
            raise PermissionDenied(f"bad label entry {entry!r}")
        source, form, audience = entry
        if not isinstance(source, str) or not isinstance(form, str):
            raise PermissionDenied(f"bad label entry {entry!r}")
        if audience is not None:
            if not isinstance(audience, list | tuple) or not all(isinstance(a, str) for a in audience):
                raise PermissionDenied(f"bad audience in label entry {entry!r}")
            audience = tuple(sorted(audience))
        taints.append(Taint(source, form, audience))
    return frozenset(taints)


def converted(label: Label, mapping: dict[str, str]) -> Label:
    """``label`` with the forms in ``mapping`` replaced (``{RAW: UPDATE}``): the one way a
    declared transform (an optimizer step, a sanitizer) turns data into something releasable."""
    if not label:
        return label
    return _converted(label, tuple(mapping.items()))


@functools.lru_cache(maxsize=1024)
def _converted(label: Label, mapping: tuple[tuple[str, str], ...]) -> Label:
    """Memoized: a walk converts the same few labels every step (labels are small and few)."""
    forms = dict(mapping)
    return frozenset(Taint(t.source, forms.get(t.form, t.form), t.audience) for t in label)


def with_form(label: Label, form: str) -> Label:
    """Every taint of ``label`` again in ``form`` too (``SHAPE``: the shape is now private)."""
    return label | frozenset(t._replace(form=form) for t in label) if label else label


# -- releases -------------------------------------------------------------------------------
class Release:
    """What a data owner lets leave from one dataset: objects whose taints from it are in one of
    :attr:`forms`, to the identities in ``to`` (``None``: to anyone who may otherwise see it).

    Subclasses name a kind and its forms; :func:`release_kind` registers them so that other rooms
    (``privacy/``: sanitized values charged to a budget, ``mpc/``: shares) add kinds of their own.
    """

    kind: ClassVar[str] = ""
    forms: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, to: Iterable[str] | None = None) -> None:
        self.to = None if to is None else tuple(sorted(set(to)))

    def allows(self, taint: Taint, requester: str) -> bool:
        return taint.form in self.forms and (self.to is None or requester in self.to)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(to={list(self.to) if self.to is not None else 'anyone'})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to == self.to  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.to))


_RELEASE_KINDS: dict[str, type[Release]] = {}


def release_kind(cls: type[Release]) -> type[Release]:
    """Class decorator: make ``cls`` a kind of release workers and the CLI know by name."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a kind name")
    _RELEASE_KINDS[cls.kind] = cls
    return cls


def release_kinds() -> dict[str, type[Release]]:
    return dict(_RELEASE_KINDS)


def make_release(kind: str, to: Iterable[str] | None = None) -> Release:
    cls = _RELEASE_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown release {kind!r}; known: {', '.join(sorted(_RELEASE_KINDS))}")
    return cls(to)


@release_kind
class Public(Release):
    """The data is not private: nothing derived from it is labelled at all (tests, demos)."""

    kind = "public"
    forms = frozenset({RAW, SHAPE, GRADIENT, UPDATE})


@release_kind
class ModelUpdates(Release):
    """Federated learning's premise: parameters changed only by optimizer steps on gradients of
    a loss over the data, and the training losses, may leave; nothing else derived does.

    It checks the *form* of what leaves, not how much it says: updates can reveal training
    data (gradient inversion), and a leader choosing the model and loss can make them reveal
    more. Differential privacy (a sanitized release) is what bounds that.
    """

    kind = "model_updates"
    forms = frozenset({UPDATE})


# -- the policy -----------------------------------------------------------------------------
class Policy:
    """The one place that decides who may do what to which object on one worker.

    Handlers ask it before every get, forward, delete, overwrite and use; every refusal is a
    :class:`PermissionDenied` naming the object, the requester and the rule, logged here.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        #: This worker's own datasets (sources) and what each lets leave.
        self.releases: dict[str, tuple[Release, ...]] = {}
        self.log = get_logger(worker=worker_id)
        self.refusals = 0

    def declare(self, source: str, releases: Iterable[Release]) -> None:
        self.releases[source] = tuple(releases)

    def public(self) -> Label:
        """The taints some declared release lets go to anyone, whatever the object: a value
        whose every taint is one of these is as free as unlabelled data (its shape too: the
        value itself may go), so the store drops them where they arise. Only releases that
        decide by form and audience alone count (a release that consults state, a budget,
        keeps its taints)."""
        return frozenset(
            Taint(source, form)
            for source, releases in self.releases.items()
            for release in releases
            if release.to is None and type(release).allows is Release.allows
            for form in release.forms
        )

    def refuse(self, obj_id: int | None, requester: str, rule: str) -> PermissionDenied:
        """The error for a refusal, logged by the owner."""
        self.refusals += 1
        what = f"object {obj_id:#x}" if obj_id is not None else "request"
        self.log.warning("refused", obj_id=obj_id, requester=requester, rule=rule)
        return PermissionDenied(f"{what} on {self.worker_id}: {requester} may not: {rule}")

    # -- what an object's label allows --------------------------------------------------------
    def releasable(self, label: Label, to: str) -> tuple[Label | None, str]:
        """The label the copy of an object carries when it goes to ``to``, or ``None`` and the
        reason when some taint does not let it go there."""
        if not label:
            return EMPTY, ""
        carried = []
        for taint in label:
            if taint.audience is not None:  # released here by its owner's worker: its audience rules
                if to not in taint.audience and to != taint.owner:
                    return None, f"{taint.source} ({taint.form}) may go only to {', '.join(taint.audience)}"
                carried.append(taint)
                continue
            if taint.owner != self.worker_id:
                return None, f"{taint.source} ({taint.form}) came without its owner's rules"
            if to == self.worker_id:
                carried.append(taint)
                continue
            rule = next((r for r in self.releases.get(taint.source, ()) if r.allows(taint, to)), None)
            if rule is None:
                declared = ", ".join(r.kind for r in self.releases.get(taint.source, ())) or "nothing"
                return None, f"{taint.source} releases {declared}; this holds it in form {taint.form}"
            if rule.to is not None:
                carried.append(taint._replace(audience=rule.to))
        return frozenset(carried), ""

    def check_leave(self, obj_id: int, label: Label, requester: str, to: str) -> Label:
        """May the object go to ``to`` (a GET's requester, or a FORWARD's destination)?"""
        carried, reason = self.releasable(label, to)
        if carried is None:
            raise self.refuse(obj_id, requester, f"its label does not let it leave to {to}: {reason}")
        return carried

    def shape_private(self, label: Label) -> bool:
        return any(t.form == SHAPE for t in label)
