"""The training a worker runs on its own data: a FedAvg job and the walking model's fused step.

A federated job (FedAvg: "train E epochs on your shard") must run on the worker as one unit, not
operation by operation, so the worker needs the model itself: it arrives as a spec
(:mod:`protocol.modules`) and its state tensors. A walking model's step is one command too, with
the parameters as one flat vector. Both are worker commands of the ``train`` command set,
registered here; their label rules say that what they compute from the data (features and
targets) is a model update, so a worker whose owner releases model updates lets the new
parameters and the losses go, and nothing else derived from the data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from actors.policy import RAW, UPDATE
from actors.registry import Declassify, command
from protocol.errors import BadArguments
from protocol.modules import build_module, load_state

#: The federated-learning command set: a worker serves it when enabled (``--enable train``).
COMMAND_SET = "train"

#: Loss name -> function, for jobs.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": F.mse_loss,
    "bce_logits": F.binary_cross_entropy_with_logits,
    "cross_entropy": F.cross_entropy,
}


@command(
    "nn.fit",
    command_set=COMMAND_SET,
    kind="job",
    context=False,
    labels=Declassify(data=(2, 3), mapping={RAW: UPDATE}),
)
def fit(
    spec: Any,
    state: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "mse",
    lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Any]:
    """Train a model on ``(x, y)`` with SGD: shuffled mini-batches, a generator seeded by ``seed``.

    Returns ``[new state tensors, mean training loss]``. The leader calls the very same function
    for its pure-PyTorch reference, so a job on one worker equals local training exactly.
    """
    loss_fn = LOSSES.get(loss)
    if loss_fn is None:
        raise BadArguments(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y):
        raise BadArguments("fit takes feature and target tensors of the same length")
    model = build_module(spec)
    load_state(model, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    total, steps = 0.0, 0
    for _ in range(int(epochs)):
        for batch in torch.randperm(len(x), generator=generator).split(int(batch_size)):
            optimizer.zero_grad()
            value = loss_fn(model(x[batch]), y[batch])
            value.backward()
            optimizer.step()
            total += value.item()
            steps += 1
    return [[t.detach().clone() for t in model.state_dict().values()], total / max(steps, 1)]


# -- one fused training step, for a model that walks from worker to worker ----------------------
class _Stepper:
    """A worker's standing copy of one model shape, for fused steps.

    Its parameters are leaves laid out in one flat buffer; a step copies the arriving vector in,
    differentiates with respect to those leaves and copies the result out. Two copies of a few
    kilobytes cost less than building a dozen fresh views every step, and the leaves never
    change, so autograd sees the same graph shape each time. The forward is planned once, as
    a list of functional calls (what ``torch.func.functional_call`` does, without its per-call
    bookkeeping, which cost more than the small models it would run here).

    A linear layer's weight leaf is the transposed view of its place in the buffer:
    ``F.linear`` on a batch is ``addmm(bias, x, weight.t())``, and holding ``weight.t()`` as the
    leaf spares autograd a transpose node per layer each way (same arithmetic, same bits;
    a step of the Table 1 MLP went from 85 to 76 us).
    """

    __slots__ = ("buffer", "leaves", "numel", "plan")

    def __init__(self, module: nn.Module) -> None:
        if any(True for _ in module.buffers()):
            raise BadArguments("a model with buffers (running statistics) cannot take fused steps")
        self.plan = [_planned(layer) for layer in module]
        shapes = [p.shape for p in module.parameters()]
        transposed = {id(layer.weight) for layer in module if isinstance(layer, nn.Linear)}
        self.numel = sum(shape.numel() for shape in shapes)
        self.buffer = torch.zeros(self.numel, dtype=torch.float32)
        self.leaves: list[torch.Tensor] = []
        chunks = self.buffer.split([s.numel() for s in shapes])
        for chunk, shape, p in zip(chunks, shapes, module.parameters(), strict=True):
            view = chunk.view(shape)
            self.leaves.append((view.t() if id(p) in transposed else view).requires_grad_(True))

    def step(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss_fn: Any, lr: float
    ) -> torch.Tensor:
        """SGD exactly as ``torch.optim.SGD`` does it: ``p.add_(grad, alpha=-lr)``."""
        if flat.requires_grad:
            flat = flat.detach()  # same storage: updated in place all the same
        leaves = self.leaves
        self.buffer.copy_(flat)  # the buffer does not require grad (only its views do)
        i = 0
        for fn, count in self.plan:
            if count == 2:
                x = fn(x, leaves[i], leaves[i + 1])
            elif count == 1:
                x = fn(x, leaves[i])
            else:
                x = fn(x)
            i += count
        value = loss_fn(x, y)
        grads = torch.autograd.grad(value, leaves)
        with torch.no_grad():
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.add_(grad, alpha=-lr)
        flat.copy_(self.buffer)
        return value.detach()


def _linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight_t.t(), bias)``, computed as ``F.linear`` itself computes it."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight_t) if bias is not None else x.mm(weight_t)
    return F.linear(x, weight_t.t(), bias)


def _planned(layer: nn.Module) -> tuple[Callable[..., torch.Tensor], int]:
    """A layer as (function of the input and its parameters, number of parameters)."""
    count = sum(1 for _ in layer.parameters(recurse=False))
    if isinstance(layer, nn.Linear):
        return _linear_t, count
    if isinstance(layer, nn.Conv2d):
        options = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
        return functools.partial(F.conv2d, groups=layer.groups, **options), count
    if count:
        raise BadArguments(f"{type(layer).__name__} cannot take a fused step")
    return layer.forward, 0


@functools.lru_cache(maxsize=8)
def _stepper(spec_key: str) -> _Stepper:
    """Built once per worker and model shape; the parameters come with each step. A few shapes
    are kept: each holds a buffer the size of its model."""
    return _Stepper(build_module(json.loads(spec_key)))


def spec_key(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """All of ``module``'s parameters in one flat float32 vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def load_flat(module: nn.Module, flat: torch.Tensor) -> None:
    """The inverse of :func:`flat_parameters`: copy the vector into the module's parameters."""
    offset = 0
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@command(
    "nn.sgd_step",
    command_set=COMMAND_SET,
    context=False,
    labels=Declassify(data=(2, 3), mapping={RAW: UPDATE}, targets=(1,)),
)
def sgd_step(
    spec: str,
    flat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "mse",
    lr: float = 0.01,
    rows: slice | None = None,
) -> torch.Tensor:
    """Forward, loss, backward and an SGD update of ``flat`` in place, as one command.

    A walking model is one flat vector, so a move carries one tensor, and a step is one message
    instead of a dozen. ``spec`` is :func:`spec_key` of the model's spec: one string to pass,
    and the key under which each worker keeps the model's skeleton. The arithmetic is
    ``torch.optim.SGD``'s (``p.add_(grad, alpha=-lr)``) on the same operations as the module's
    own forward, so it equals a local step exactly. ``rows`` selects the batch from ``x`` and
    ``y`` here, sparing the two slicing commands.
    """
    loss_fn = LOSSES.get(loss)
    if loss_fn is None:
        raise BadArguments(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if not isinstance(spec, str):
        raise BadArguments("nn.sgd_step takes the model spec as its JSON key (privacy.federated.spec_key)")
    try:
        stepper = _stepper(spec)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise BadArguments(f"bad model spec: {exc}") from exc
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.float32 or flat.shape != (stepper.numel,):
        shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise BadArguments(f"the model has {stepper.numel} float32 parameters, got {shape}")
    if rows is not None:
        x, y = x[rows], y[rows]
    return stepper.step(flat, x, y, loss_fn, lr)
