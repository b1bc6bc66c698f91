"""The commands a worker can run beyond the torch allowlist: one registry, filled by the rooms
that own them.

A room extends the runtime by decorating its functions here (``privacy/`` registers training
steps, ``mpc/`` its protocols), never by editing a table in ``actors/`` or ``protocol/``::

    @command("nn.sgd_step", command_set="train", context=False, labels=Declassify(...))
    def sgd_step(spec, flat, x, y, *, lr): ...

    @command("demo.exchange", command_set="demo", kind="flow")
    async def exchange(ctx, value, *, peer):
        ctx.send(peer, "value", value)
        return value + await ctx.recv(peer, "value")

Kinds: *plain* runs inline on the worker's loop (the hot path), *job* in a thread (the worker
keeps serving meanwhile), *flow* as its own task that may talk to other parties. A worker serves
the command sets it is told to (``Worker(enable=...)``, ``aiosyft worker --enable``).

Label rules (``labels=``) say how a command's result and in-place targets are labelled; without
one, a result carries the union of its arguments' labels. Only a rule can declassify.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.policy import EMPTY, Label, converted

if TYPE_CHECKING:
    from actors.store import ObjectStore

KINDS = ("plain", "job", "flow")
#: The torch allowlist (``protocol.allowlist``): every worker serves it.
CORE = "torch"


class LabelIO:
    """What a label rule sees of one command: its arguments' labels by position, and the store
    to grow in-place targets in. ``refs[i]`` are the object ids positional argument ``i`` named
    (a list argument may name several); ``kwrefs`` the same for keyword arguments."""

    __slots__ = ("store", "refs", "kwrefs", "args", "kwargs")

    def __init__(
        self,
        store: ObjectStore,
        refs: list[list[int]],
        kwrefs: dict[str, list[int]],
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> None:
        self.store = store
        self.refs = refs
        self.kwrefs = kwrefs
        self.args = args
        self.kwargs = kwargs

    def ids(self, position: int | str) -> list[int]:
        if isinstance(position, str):
            return self.kwrefs.get(position, [])
        return self.refs[position] if position < len(self.refs) else []

    def of(self, *positions: int | str) -> Label:
        """The union of the labels of the objects the given arguments name."""
        label = EMPTY
        for position in positions:
            for obj_id in self.ids(position):
                own = self.store.label(obj_id)
                if own:
                    label = label | own
        return label

    def everything(self) -> Label:
        return self.of(*range(len(self.refs)), *self.kwrefs)

    def grads(self, position: int | str) -> Label:
        label = EMPTY
        for obj_id in self.ids(position):
            for member in self.store.members(obj_id):
                grad = self.store.grad_labels.get(member)
                if grad:
                    label = label | grad
        return label

    def grow(self, position: int | str, label: Label) -> None:
        for obj_id in self.ids(position):
            self.store.grow(obj_id, label)


LabelRule = Callable[[LabelIO], Label]


@dataclass(frozen=True)
class Declassify:
    """A declared transform: what a command computes from its *data* arguments takes new forms
    (``mapping``, e.g. raw data into a model update), while every other argument's label passes
    through unchanged, so data copied in through another argument stays raw. ``targets`` are
    written in place and take the same label as the result. ``when`` may refuse the
    transform for some calls (then labels flow as for any command)."""

    data: tuple[int | str, ...]
    mapping: dict[str, str]
    targets: tuple[int | str, ...] = ()
    when: Callable[[list[Any], dict[str, Any]], bool] | None = None

    def __call__(self, io: LabelIO) -> Label:
        labels = io.store.labels
        if not labels:  # nothing on this worker is labelled: nothing to carry or convert
            return EMPTY
        data = other = EMPTY
        for position, refs in (*enumerate(io.refs), *io.kwrefs.items()):
            for obj_id in refs:
                own = labels.get(obj_id)
                if own:
                    if position in self.data:
                        data = data | own
                    else:
                        other = other | own
        if data and (self.when is None or self.when(io.args, io.kwargs)):
            data = converted(data, self.mapping)
        label = data | other
        if label:
            for target in self.targets:
                io.grow(target, label)
        return label


@dataclass(frozen=True)
class CommandSpec:
    name: str
    fn: Callable[..., Any]
    command_set: str
    kind: str = "plain"
    #: Whether ``fn`` takes a :class:`~actors.context.Context` first.
    context: bool = True
    labels: LabelRule | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, CommandSpec] = {}
_LABEL_RULES: dict[str, LabelRule] = {}


def command(
    name: str,
    *,
    command_set: str,
    kind: str = "plain",
    context: bool = True,
    labels: LabelRule | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as worker command ``name`` in ``command_set``."""
    if kind not in KINDS:
        raise ValueError(f"unknown command kind {kind!r}; expected one of {KINDS}")
    if command_set == CORE:
        raise ValueError(f"{CORE!r} is the torch allowlist; register into a set of your own")
    if kind == "flow" and not context:
        raise ValueError("a flow needs its context: it talks to parties through it")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"command {name!r} is already registered by {existing.fn.__module__}")
        _REGISTRY[name] = CommandSpec(name, fn, command_set, kind, context, labels)
        return fn

    return register


def label_rule(op: str) -> Callable[[LabelRule], LabelRule]:
    """Register how an allowlisted torch operation labels its result (e.g. that an optimizer
    step turns gradients into model updates). Only rooms that define a release need this."""

    def register(rule: LabelRule) -> LabelRule:
        _LABEL_RULES[op] = rule
        return rule

    return register


def label_rules() -> dict[str, LabelRule]:
    return dict(_LABEL_RULES)


def command_sets() -> set[str]:
    """The sets some loaded package registered (plus the torch allowlist)."""
    return {CORE} | {spec.command_set for spec in _REGISTRY.values()}


def commands_for(sets: Iterable[str] | None) -> dict[str, CommandSpec]:
    """The registered commands of ``sets`` (``None``: every registered set); an unknown set
    is an error naming it, so a typo in ``--enable`` never silently serves less."""
    if sets is None:
        return dict(_REGISTRY)
    wanted = set(sets) - {CORE}
    unknown = wanted - command_sets()
    if unknown:
        known = ", ".join(sorted(command_sets()))
        raise ValueError(f"unknown command set(s) {', '.join(sorted(unknown))}; loaded: {known}")
    return {name: spec for name, spec in _REGISTRY.items() if spec.command_set in wanted}
