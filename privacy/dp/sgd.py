"""DP-SGD where the data is: the owner's worker samples a lot, clips and noises, and charges.

One command, ``dp.sgd_step``, takes a walking model's flat parameters and the worker's own data
and does what Abadi et al. (2016) prescribe, on the worker that owns the data:

1. **Poisson sampling**: each of the worker's N examples joins the lot with probability
   ``q = L / N`` (``L`` the expected lot size), from a generator seeded by ``os.urandom``; a lot
   may be empty or of any size.
2. **Charge** the lot to the owner's ledger (a Poisson-subsampled Gaussian at rate ``q`` and
   noise ``sigma``) before anything is computed: over budget, the step is refused.
3. **Per-example gradients, clipped to C over all parameters jointly**, without materializing
   them: for a dense layer on one example the weight gradient is the outer product of the
   gradient at the layer's output and its input, so its squared norm is the product of their
   squared norms ("ghost clipping"); one backward gives every layer's output gradients, and the
   clipped sum is one matrix product per layer.
4. **Gaussian noise** ``N(0, sigma^2 C^2)`` on every coordinate, **divided by L** (the expected
   lot size, as the analysis assumes), and the SGD update of the parameters in place.

Its label rule makes the new parameters *sanitized* (:mod:`privacy.dp.release`); the loss is
never returned (it is not sanitized).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actors.context import Context
from actors.policy import RAW
from actors.registry import Declassify, command
from privacy.dp.ledger import Ledger, Plan
from privacy.dp.release import SANITIZED, Sanitized
from protocol.errors import BadArguments
from protocol.modules import build_module

#: The DP command set (``aiosyft worker --enable dp``).
COMMAND_SET = "dp"

#: Per-example losses (``reduction="none"``, averaged over each example's outputs).
PER_EXAMPLE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda out, y: (out - y).pow(2).flatten(1).mean(1),
    "bce_logits": lambda out, y: (
        torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").flatten(1).mean(1)
    ),
}


#: d(per-example loss)/d(output), per example (the losses of ``PER_EXAMPLE``).
OUTPUT_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda out, y: torch.sub(out, y).mul_(2.0 / math.prod(out.shape[1:])),
    "bce_logits": lambda out, y: torch.sigmoid(out).sub_(y).mul_(1.0 / math.prod(out.shape[1:])),
}
#: Activation -> the gradient at its input from the gradient at its output, its input and its
#: output. ReLU's is the kernel autograd itself runs for it, one call instead of three.
ACTIVATION_BACKWARD: dict[type, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda g, inp, out: torch.ops.aten.threshold_backward(g, out, 0.0),
    nn.Sigmoid: lambda g, inp, out: g * out * (1 - out),
    nn.Tanh: lambda g, inp, out: g * (1 - out * out),
    nn.Identity: lambda g, inp, out: g,
}


_ONE = torch.ones(())


class GhostModel:
    """A sequence of dense layers and parameter-free activations, over a flat parameter vector
    laid out as ``named_parameters`` lays it (each layer's weight, then its bias).

    At the lot sizes of DP-SGD a step is a few dozen small kernels, so their number is the cost:
    the flat vector is cut into its parameters by one ``split``, and the clipped sum is built by
    one ``cat`` rather than slice by slice."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Sequential):
            raise BadArguments("DP-SGD steps take a Sequential model")
        #: ("linear", (index of its weight among the pieces, weight shape, index of its bias or
        #: None)) or ("act", the activation module).
        self.layers: list[tuple[str, Any]] = []
        self.sizes: list[int] = []  # the pieces of the flat vector, in order
        for layer in module:
            if isinstance(layer, nn.Linear):
                self.sizes.append(layer.weight.numel())
                bias_at = None
                if layer.bias is not None:
                    self.sizes.append(layer.bias.numel())
                    bias_at = len(self.sizes) - 1
                weight_at = len(self.sizes) - (2 if bias_at is not None else 1)
                self.layers.append(("linear", (weight_at, tuple(layer.weight.shape), bias_at)))
            elif any(True for _ in layer.parameters()):
                raise BadArguments(f"{type(layer).__name__}: DP-SGD here takes Linear layers and activations")
            else:
                self.layers.append(("act", layer))
        self.numel = sum(self.sizes)
        self.manual = all(kind == "linear" or type(spec) in ACTIVATION_BACKWARD for kind, spec in self.layers)

    def _parameters(self, flat: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each dense layer's weight and bias (views of ``flat``), by its position in the model."""
        pieces = flat.split(self.sizes)
        return {
            position: (pieces[spec[0]].view(spec[1]), None if spec[2] is None else pieces[spec[2]])
            for position, (kind, spec) in enumerate(self.layers)
            if kind == "linear"
        }

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
        return a @ weight.t() if bias is None else torch.addmm(bias, a, weight.t())

    def _backward_by_hand(
        self,
        params: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        x: torch.Tensor,
        y: torch.Tensor,
        loss: str,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each dense layer's inputs and output gradients, per example, by the chain rule written
        out (the activations here have closed-form derivatives): no graph, no autograd engine,
        which at a lot of 8 cost more than the arithmetic."""
        stored: list[tuple[str, Any, torch.Tensor, torch.Tensor]] = []
        a = x
        for position, (kind, spec) in enumerate(self.layers):
            out = self._linear(*params[position], a) if kind == "linear" else spec(a)
            stored.append((kind, spec, a, out))
            a = out
        g = OUTPUT_GRADS[loss](a, y)
        inputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for index in range(len(stored) - 1, -1, -1):
            kind, spec, a_in, out = stored[index]
            if kind == "linear":
                inputs.append(a_in)
                grads.append(g)
                if index:
                    g = g @ params[index][0]
            else:
                g = ACTIVATION_BACKWARD[type(spec)](g, a_in, out)
        return inputs[::-1], grads[::-1]

    def _backward_by_autograd(
        self,
        params: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        x: torch.Tensor,
        y: torch.Tensor,
        loss: str,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, outputs = [], []
        a = x
        for position, (kind, spec) in enumerate(self.layers):
            if kind == "act":
                a = spec(a)
                continue
            z = self._linear(*params[position], a)
            if not z.requires_grad:  # the first layer: the graph starts at its output
                z.requires_grad_(True)
            inputs.append(a.detach())
            outputs.append(z)
            a = z
        total = PER_EXAMPLE[loss](a, y).sum()
        return inputs, list(torch.autograd.grad(total, outputs))

    def clipped_sum(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: str, clip: float
    ) -> torch.Tensor:
        """Sum over the examples of each one's gradient clipped to L2 norm ``clip`` (flat)."""
        params = self._parameters(flat)
        if self.manual and loss in OUTPUT_GRADS:
            inputs, grads = self._backward_by_hand(params, x, y, loss)
        else:
            inputs, grads = self._backward_by_autograd(params, x, y, loss)
        dense = [spec for kind, spec in self.layers if kind == "linear"]
        layer_norms = []  # per layer and example: |g_i| * |(a_i, 1)|, its gradient's norm
        for spec, a_in, g in zip(dense, inputs, grads, strict=True):
            reach = torch.linalg.vector_norm(a_in, dim=1)
            if spec[2] is not None:
                reach = torch.hypot(reach, _ONE)
            layer_norms.append(torch.linalg.vector_norm(g, dim=1).mul_(reach))
        norms = torch.linalg.vector_norm(torch.stack(layer_norms), dim=0)
        factors = norms.add_(1e-6).reciprocal_().mul_(clip).clamp_(max=1.0).unsqueeze(1)
        parts: list[torch.Tensor] = []
        for spec, a_in, g in zip(dense, inputs, grads, strict=True):
            scaled = g * factors
            parts.append((scaled.t() @ a_in).view(-1))
            if spec[2] is not None:
                parts.append(scaled.sum(0))
        return torch.cat(parts)


@functools.lru_cache(maxsize=8)
def _model(spec_key: str) -> GhostModel:
    return GhostModel(build_module(json.loads(spec_key)))


def generator_for(ctx: Context) -> torch.Generator:
    """The worker's sampling and noise generator, seeded once from the operating system."""
    generator = ctx.state.get("dp.generator")
    if generator is None:
        generator = ctx.state["dp.generator"] = torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little")
        )
    return generator


def ledger_for(ctx: Context, source: str, release: Sanitized) -> Ledger:
    ledgers: dict[str, Ledger] = ctx.state.setdefault("dp.ledgers", {})
    ledger = ledgers.get(source)
    if ledger is None:
        ledger = ledgers[source] = Ledger(
            source, release.epsilon, release.delta, release.ledger, accountant=release.accountant
        )
    return ledger


def charge(ctx: Context, *charges: tuple[Plan, int]) -> None:
    """Charge ``charges`` (lots of each plan) to every dataset of this worker whose data the
    command reads under a sanitized release (the others' data stays raw in the result, and
    cannot leave). All or nothing: every ledger is checked before any is charged."""
    ledgers = []
    for taint in ctx.label:
        if taint.form != RAW or taint.owner != ctx.me:
            continue
        release = next(
            (r for r in ctx.policy.releases.get(taint.source, ()) if isinstance(r, Sanitized)), None
        )
        if release is not None:
            ledgers.append(ledger_for(ctx, taint.source, release))
    for ledger in ledgers:
        ledger.check(charges)
    for ledger in ledgers:
        if len(charges) == 1:
            ledger.charge(*charges[0])
        else:
            ledger.charge_all(charges)


def check_rows(ctx: Context, x: torch.Tensor, y: torch.Tensor, command: str = "dp.sgd_step") -> None:
    """The lot must come from data this worker published as it is: one record per row is what
    the clipping bounds. A tensor the leader derived (``x.mean(0).expand(n, d)``, rows mixed
    with rows) would let one record move every row, and the noise would not cover it."""
    objects = ctx.store.objects
    published = [objects[i] for i in ctx.store.ids_owned_by(ctx.me)]
    if not any(x is value for value in published) or not any(y is value for value in published):
        raise BadArguments(
            f"{command} takes the worker's published data itself (x and y as published), "
            "not a tensor derived from it: the privacy analysis bounds one record per row"
        )


@command(
    "dp.sgd_step",
    command_set=COMMAND_SET,
    labels=Declassify(data=(2, 3), mapping={RAW: SANITIZED}, targets=(1,)),
)
def dp_sgd_step(
    ctx: Context,
    spec: str,
    flat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lot: float,
    clip: float,
    sigma: float,
    lr: float,
    loss: str = "mse",
) -> None:
    """One DP-SGD step on a lot Poisson-sampled here (see the module docstring)."""
    if loss not in PER_EXAMPLE:
        raise BadArguments(f"unknown loss {loss!r}; known: {', '.join(PER_EXAMPLE)}")
    model = _model(spec) if isinstance(spec, str) else None
    if model is None:
        raise BadArguments("dp.sgd_step takes the model spec as its JSON key (privacy.federated.spec_key)")
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.float32 or flat.shape != (model.numel,):
        raise BadArguments(f"the model has {model.numel} float32 parameters")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(y) > 0):
        raise BadArguments("x and y must be tensors with the same positive number of rows")
    if not (0 < lot <= len(x)) or not clip > 0 or not sigma >= 0 or not lr > 0:
        raise BadArguments(f"need 0 < lot <= {len(x)}, clip > 0, sigma >= 0, lr > 0")
    check_rows(ctx, x, y)
    charge(ctx, (Plan(lot / len(x), sigma), 1))
    generator = generator_for(ctx)
    rows = (torch.rand(len(x), generator=generator) < lot / len(x)).nonzero().view(-1)  # the lot
    flat = flat.detach() if flat.requires_grad else flat
    summed = (
        model.clipped_sum(flat, x.index_select(0, rows), y.index_select(0, rows), loss, clip)
        if len(rows)
        else torch.zeros_like(flat)
    )
    summed.add_(torch.empty_like(flat).normal_(0.0, sigma * clip, generator=generator))
    flat.sub_(summed, alpha=lr / lot)


__all__ = ["COMMAND_SET", "GhostModel", "charge", "check_rows", "dp_sgd_step", "generator_for", "ledger_for"]
