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
    "mse": lambda out, y: (out - y) * (2.0 / out[0].numel()),
    "bce_logits": lambda out, y: (torch.sigmoid(out) - y) * (1.0 / out[0].numel()),
}
#: Activation -> its derivative from its input and output.
ACTIVATION_GRADS: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda inp, out: (inp > 0).to(inp.dtype),
    nn.Sigmoid: lambda inp, out: out * (1 - out),
    nn.Tanh: lambda inp, out: 1 - out * out,
    nn.Identity: lambda inp, out: torch.ones_like(out),
}


class GhostModel:
    """A sequence of dense layers and parameter-free activations, over a flat parameter vector
    laid out as ``named_parameters`` lays it (each layer's weight, then its bias)."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Sequential):
            raise BadArguments("DP-SGD steps take a Sequential model")
        self.layers: list[tuple[str, Any]] = []
        offset = 0
        for layer in module:
            if isinstance(layer, nn.Linear):
                w = layer.weight.numel()
                b = layer.bias.numel() if layer.bias is not None else 0
                self.layers.append(("linear", (offset, tuple(layer.weight.shape), offset + w if b else None)))
                offset += w + b
            elif any(True for _ in layer.parameters()):
                raise BadArguments(f"{type(layer).__name__}: DP-SGD here takes Linear layers and activations")
            else:
                self.layers.append(("act", layer))
        self.numel = offset
        self.manual = all(kind == "linear" or type(spec) in ACTIVATION_GRADS for kind, spec in self.layers)

    def _weight(self, flat: torch.Tensor, spec: Any) -> torch.Tensor:
        offset, shape, _ = spec
        return flat[offset : offset + shape[0] * shape[1]].view(shape)

    def _linear(self, flat: torch.Tensor, spec: Any, a: torch.Tensor) -> torch.Tensor:
        _, shape, bias_at = spec
        if bias_at is None:
            return a @ self._weight(flat, spec).t()
        return torch.addmm(flat[bias_at : bias_at + shape[0]], a, self._weight(flat, spec).t())

    def _backward_by_hand(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: str
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each dense layer's inputs and output gradients, per example, by the chain rule written
        out (the activations here have closed-form derivatives): no graph, no autograd engine,
        which at a lot of 8 cost more than the arithmetic."""
        stored: list[tuple[str, Any, torch.Tensor, torch.Tensor]] = []
        a = x
        for kind, spec in self.layers:
            out = self._linear(flat, spec, a) if kind == "linear" else spec(a)
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
                    g = g @ self._weight(flat, spec)
            else:
                g = g * ACTIVATION_GRADS[type(spec)](a_in, out)
        return inputs[::-1], grads[::-1]

    def _backward_by_autograd(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: str
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, outputs = [], []
        a = x
        for kind, spec in self.layers:
            if kind == "act":
                a = spec(a)
                continue
            z = self._linear(flat, spec, a)
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
        if self.manual and loss in OUTPUT_GRADS:
            inputs, grads = self._backward_by_hand(flat, x, y, loss)
        else:
            inputs, grads = self._backward_by_autograd(flat, x, y, loss)
        norms = torch.zeros(len(x), dtype=flat.dtype)
        dense = [spec for kind, spec in self.layers if kind == "linear"]
        for spec, a_in, g in zip(dense, inputs, grads, strict=True):
            bias = 1.0 if spec[2] is not None else 0.0
            norms += g.pow(2).sum(1) * (a_in.pow(2).sum(1) + bias)
        factors = (clip / (norms.sqrt() + 1e-6)).clamp(max=1.0)
        out = torch.zeros_like(flat)
        for spec, a_in, g in zip(dense, inputs, grads, strict=True):
            offset, shape, bias_at = spec
            scaled = g * factors[:, None]
            out[offset : offset + shape[0] * shape[1]] = (scaled.t() @ a_in).reshape(-1)
            if bias_at is not None:
                out[bias_at : bias_at + shape[0]] = scaled.sum(0)
        return out


@functools.lru_cache(maxsize=8)
def _model(spec_key: str) -> GhostModel:
    return GhostModel(build_module(json.loads(spec_key)))


def _generator(ctx: Context) -> torch.Generator:
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
        ledger = ledgers[source] = Ledger(source, release.epsilon, release.delta, release.ledger)
    return ledger


def _charge(ctx: Context, plan: Plan) -> None:
    """Charge the lot to every dataset of this worker whose data it reads under a sanitized
    release (the others' data stays raw in the result, and cannot leave)."""
    for taint in ctx.label:
        if taint.form != RAW or taint.owner != ctx.me:
            continue
        release = next(
            (r for r in ctx.policy.releases.get(taint.source, ()) if isinstance(r, Sanitized)), None
        )
        if release is not None:
            ledger_for(ctx, taint.source, release).charge(plan)


def _check_rows(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> None:
    """The lot must come from data this worker published as it is: one record per row is what
    the clipping bounds. A tensor the leader derived (``x.mean(0).expand(n, d)``, rows mixed
    with rows) would let one record move every row, and the noise would not cover it."""
    objects = ctx.store.objects
    published = [objects[i] for i in ctx.store.ids_owned_by(ctx.me)]
    if not any(x is value for value in published) or not any(y is value for value in published):
        raise BadArguments(
            "dp.sgd_step takes the worker's published data itself (x and y as published), "
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
    _check_rows(ctx, x, y)
    _charge(ctx, Plan(lot / len(x), sigma))
    generator = _generator(ctx)
    chosen = torch.rand(len(x), generator=generator) < lot / len(x)
    flat = flat.detach() if flat.requires_grad else flat
    summed = (
        model.clipped_sum(flat, x[chosen], y[chosen], loss, clip)
        if bool(chosen.any())
        else torch.zeros_like(flat)
    )
    noise = torch.normal(0.0, sigma * clip, flat.shape, generator=generator)
    flat.sub_((summed + noise) * (lr / lot))


__all__ = ["COMMAND_SET", "GhostModel", "dp_sgd_step"]
