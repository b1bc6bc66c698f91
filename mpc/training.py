"""Encrypted training: SGD on a shared MLP, every gradient computed on shares.

For ``Linear -> ApproxSigmoid -> ... -> Linear`` and the mean squared error, the backward pass is
written out (no autograd on shares): the output error ``2 (y_hat - y) / N``, each Linear's
``dW = delta^T @ a`` and ``db = sum(delta)``, the error passed back ``delta @ W`` times the
derivative of the sigmoid polynomial (an even polynomial of the same ``x / 8`` whose powers the
forward already made), and the update ``W - lr dW``. Every product is a Beaver product; the
step's independent products (a layer's ``dW`` and its ``delta @ W``) share their rounds.

Small public factors (a learning rate of 1e-3 times ``2 / N``) would round to a few units in
16 fractional bits, so they are applied with extra fractional bits (``SharedTensor.scale``) and
truncated once. :func:`reference_step` is the same arithmetic in plain PyTorch floats, for the
comparison that says encryption changes nothing but rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpc.nn import ApproxSigmoid, SharedModule
from mpc.sigmoid import RANGE, coefficients, odd_powers
from mpc.tensor import SharedTensor


@dataclass
class _Activation:
    y: SharedTensor  # the pre-activation over 8
    even: dict[int, SharedTensor]  # y^2, y^4, ... for the derivative


def _sigmoid_with_powers(x: SharedTensor, degree: int) -> tuple[SharedTensor, _Activation]:
    y = x * (1.0 / RANGE)
    powers = odd_powers(y, degree)
    scaled = [c * RANGE**k for k, c in zip(range(1, degree + 1, 2), coefficients(degree), strict=True)]
    out = y.combine([(c, powers[k]) for k, c in zip(range(1, degree + 1, 2), scaled, strict=True)], 0.5)
    even = _even_powers(y, powers, degree)
    return out, _Activation(y, even)


def _even_powers(y: SharedTensor, odd: dict[int, SharedTensor], degree: int) -> dict[int, SharedTensor]:
    """``y^k`` for even ``0 < k < degree`` (the derivative's powers), each one product away."""
    even: dict[int, SharedTensor] = {}
    for k in range(2, degree, 2):
        even[k] = odd[k - 1] * y
    return even


def _sigmoid_derivative(act: _Activation, degree: int) -> SharedTensor:
    """d/dx of the polynomial: sum of k c_k 8^k y^(k-1) / 8 over odd k."""
    terms = []
    constant = 0.0
    for k, c in zip(range(1, degree + 1, 2), coefficients(degree), strict=True):
        factor = k * c * RANGE ** (k - 1)
        if k == 1:
            constant = factor
        else:
            terms.append((factor, act.even[k - 1]))
    return act.y.combine(terms, constant)


def _check(module: SharedModule) -> int:
    degrees = {layer.degree for layer in module.layers if isinstance(layer, ApproxSigmoid)}
    for i, layer in enumerate(module.layers):
        expected = nn.Linear if i % 2 == 0 else ApproxSigmoid
        if not isinstance(layer, expected) or (i == len(module.layers) - 1 and expected is not nn.Linear):
            raise TypeError("encrypted training takes Linear, ApproxSigmoid, Linear, ..., Linear")
    return degrees.pop() if degrees else 7


def sgd_step(module: SharedModule, x: SharedTensor, y: SharedTensor, lr: float) -> SharedTensor:
    """One step of SGD on the mean squared error; updates ``module`` and returns the output (its
    loss is for whoever may reconstruct it). Nothing waits: the step is issued at once."""
    degree = _check(module)
    inputs, activations = [x], []
    a = x
    for i, (layer, params) in enumerate(zip(module.layers, module.parameters, strict=True)):
        if isinstance(layer, nn.Linear):
            a = a @ params["weight"].t() + params["bias"] if "bias" in params else a @ params["weight"].t()
            if i < len(module.layers) - 1:
                inputs.append(a)
        else:
            a, act = _sigmoid_with_powers(a, degree)
            activations.append(act)
            inputs[-1] = a  # the next Linear's input
    output = a
    count = output.numel()
    delta = (output - y).scale(2.0 / count)
    linears = [
        p for layer, p in zip(module.layers, module.parameters, strict=True) if isinstance(layer, nn.Linear)
    ]
    updates = []
    for index in range(len(linears) - 1, -1, -1):
        params = linears[index]
        grad_w = delta.t() @ inputs[index]
        grad_b = delta.sum(0) if "bias" in params else None
        if index > 0:
            back = delta @ params["weight"]
            delta = back * _sigmoid_derivative(activations[index - 1], degree)
        updates.append((params, grad_w, grad_b))
    for params, grad_w, grad_b in updates:
        params["weight"] = params["weight"] - grad_w.scale(lr)
        if grad_b is not None:
            params["bias"] = params["bias"] - grad_b.scale(lr)
    return output


def reference_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """The same step in plain PyTorch (autograd and ``torch.optim.SGD``'s update)."""
    model.zero_grad()
    output = model(x)
    loss = ((output - y) ** 2).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    return output.detach()
