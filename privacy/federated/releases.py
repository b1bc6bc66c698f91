"""What makes the *model updates* release (:class:`actors.policy.ModelUpdates`) work for a model
trained operation by operation: the label rules of the optimizer steps and the scalar losses.

A data owner that publishes with ``ModelUpdates`` lets two things derived from its data leave
its worker: parameters changed by optimizer steps on gradients of a loss over the data, and the
training losses. Everything else computed from the data stays raw and stays put. These rules
say which results are those two things:

* an optimizer step (``optim.sgd_step``, ``Optimizer.step``): what the gradients written by
  ``backward`` carried into the parameters becomes a model update. Only gradients change form:
  anything else in them (say raw data copied into a gradient with ``set_grad``) keeps its form,
  so parameters it was written into can never leave;
* a scalar loss (mean or sum) of a computed output that requires grad (a model's output) against
  targets is a training loss, a model update. An elementwise loss (``reduction="none"``), or a
  loss of something not computed (a leaf, such as a copy of the data made to require grad), is
  an ordinary computation on the data. A computation that merely passes the data through
  (``w * 0 + x``) cannot be told apart from a model: see below.

The fused commands (``nn.sgd_step``, ``nn.fit``) declare theirs where they are registered
(:mod:`privacy.federated.steps`).

**What this release does not bound.** It checks the *form* of what leaves, not how much it
reveals. A leader chooses the model and the loss: it can make an update or a loss reveal
training records (gradient inversion; a loss over a batch of one element, or of a "model" that
passes its input through). Federated learning's premise is that the owner accepts this;
differential privacy (a sanitized release charged to a budget) is what bounds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from actors.policy import EMPTY, GRADIENT, RAW, UPDATE, Label, converted
from actors.registry import LabelIO, label_rule

#: The optimizer steps the walk uses (and ``torch.optim`` optimizers on a worker).
OPTIMIZER_STEPS = ("optim.sgd_step", "Optimizer.step")

#: Losses that reduce to one number; wire name -> the function (for where its reduction is).
SCALAR_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "F.mse_loss": F.mse_loss,
    "F.l1_loss": F.l1_loss,
    "F.smooth_l1_loss": F.smooth_l1_loss,
    "F.huber_loss": F.huber_loss,
    "F.binary_cross_entropy": F.binary_cross_entropy,
    "F.binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    "F.cross_entropy": F.cross_entropy,
    "F.nll_loss": F.nll_loss,
}
#: Reductions that give one number (``"none"`` gives one per element).
_SCALAR = frozenset({"mean", "sum"})


def _own(io: LabelIO, position: int) -> Label:
    """The label of the objects at ``position`` and of everything sharing their storage (an
    optimizer shares its parameters')."""
    label = EMPTY
    for obj_id in io.ids(position):
        for member in io.store.members(obj_id):
            label = label | io.store.label(member)
    return label


def optimizer_step(io: LabelIO) -> Label:
    """The parameters' new label: theirs, plus what the gradients carried, as a model update."""
    label = _own(io, 0) | converted(io.grads(0), {GRADIENT: UPDATE})
    io.grow(0, label)
    return label


for _op in OPTIMIZER_STEPS:
    label_rule(_op)(optimizer_step)


def _reduces_to_a_scalar(signature: inspect.Signature, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the call is a loss of a model's output reduced to one number. Arguments that do
    not bind (the call failed) or legacy options that keep the elements (``reduce=False``)
    say no."""
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return False
    output = arguments.get("input")
    if not (isinstance(output, torch.Tensor) and output.requires_grad and output.grad_fn is not None):
        return False
    if arguments.get("reduce") not in (None, True):
        return False
    return arguments.get("reduction", "mean") in _SCALAR


def scalar_loss(fn: Callable[..., Any]) -> Callable[[LabelIO], Label]:
    """The label rule of loss ``fn``: a training loss is a model update; the other arguments
    (class weights, say) keep their labels."""
    signature = inspect.signature(fn)

    def rule(io: LabelIO) -> Label:
        everything = [*range(len(io.refs)), *io.kwrefs]
        if not _reduces_to_a_scalar(signature, io.args, io.kwargs):
            return io.of(*everything)
        data = [p for p in everything if p in (0, 1, "input", "target")]
        others = [p for p in everything if p not in data]
        return converted(io.of(*data), {RAW: UPDATE}) | io.of(*others)

    rule.__name__ = rule.__qualname__ = f"scalar_loss[{fn.__name__}]"
    return rule


for _op, _fn in SCALAR_LOSSES.items():
    label_rule(_op)(scalar_loss(_fn))
