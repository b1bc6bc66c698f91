"""Encrypted models: a network's parameters shared over the parties, its forward on shares.

``share_module(model, alice, bob, crypto_provider=carol)`` (or, with the hook,
``model.fix_precision().share(...)``) shares every parameter and returns a
:class:`SharedModule` whose call takes a :class:`~mpc.tensor.SharedTensor` and returns one.
The layers are the ones that have a protocol: ``Linear``, ``Conv2d``, ``AvgPool2d``,
``Flatten`` and the sigmoid (``nn.Sigmoid`` runs as its polynomial approximation,
:mod:`mpc.sigmoid`: train the plaintext model with :class:`ApproxSigmoid` to run under
encryption exactly the function it learned). Anything else is refused by name: ReLU and max
pooling need comparisons, which this package does not offer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import actors
from mpc.ring import PRECISION
from mpc.sigmoid import DEGREE, approx
from mpc.tensor import SharedTensor, share


class ApproxSigmoid(nn.Module):
    """The sigmoid polynomial of :mod:`mpc.sigmoid` as a plaintext layer."""

    def __init__(self, degree: int = DEGREE) -> None:
        super().__init__()
        self.degree = degree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx(x, self.degree)


SUPPORTED = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.Flatten, nn.Sigmoid, ApproxSigmoid, nn.Sequential)


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` with their ``named_parameters`` prefixes, nested Sequentials
    flattened; a layer without a protocol is refused by name."""
    if isinstance(model, nn.Sequential):
        return [leaf for name, child in model.named_children() for leaf in _leaves(child, f"{prefix}{name}.")]
    if not isinstance(model, SUPPORTED):
        raise TypeError(
            f"{type(model).__name__} has no protocol here: encrypted models are built of "
            f"{', '.join(t.__name__ for t in SUPPORTED)}"
        )
    return [(prefix, model)]


class SharedModule:
    """A model whose parameters are shared; calling it runs the forward on shares."""

    def __init__(self, layers: list[nn.Module], parameters: list[dict[str, SharedTensor]]) -> None:
        self.layers = layers
        self.parameters = parameters

    def __call__(self, x: SharedTensor) -> SharedTensor:
        for layer, params in zip(self.layers, self.parameters, strict=True):
            x = _forward(layer, params, x)
        return x

    def named_parameters(self) -> list[tuple[str, SharedTensor]]:
        return [(f"{i}.{name}", p) for i, params in enumerate(self.parameters) for name, p in params.items()]

    async def float_precision(self) -> nn.Sequential:
        """Reconstruct a plaintext copy (where the parties' policy lets the shares come here)."""
        layers = []
        for layer, params in zip(self.layers, self.parameters, strict=True):
            clone = copy.deepcopy(layer)
            for name, value in params.items():
                getattr(clone, name).data.copy_(await value.get())
            layers.append(clone)
        return nn.Sequential(*layers)


def _forward(layer: nn.Module, params: dict[str, SharedTensor], x: SharedTensor) -> SharedTensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, params["weight"], params.get("bias"))
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation not in ((1, 1), 1) or isinstance(layer.padding, str):
            raise TypeError("shared convolutions take groups=1, dilation=1 and numeric padding")
        return F.conv2d(x, params["weight"], params.get("bias"), stride=layer.stride, padding=layer.padding)
    if isinstance(layer, nn.AvgPool2d):
        return F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, nn.Flatten):
        return x.flatten(layer.start_dim, layer.end_dim)
    if isinstance(layer, ApproxSigmoid):
        from mpc.sigmoid import sigmoid  # noqa: PLC0415

        return sigmoid(x, layer.degree)
    return x.sigmoid()


def share_module(
    model: Any,
    *parties: actors.RemoteWorker,
    crypto_provider: actors.RemoteWorker | None = None,
    precision: int = PRECISION,
) -> SharedModule:
    """Every parameter of ``model`` shared over ``parties``: a module of :data:`SUPPORTED`
    layers (encoded with ``precision``), or one already fixed (``model.fix_precision()``, its
    own precision)."""
    fixed = dict(model.named_fixed_parameters()) if hasattr(model, "named_fixed_parameters") else None
    skeleton = model.skeleton if fixed is not None else model
    leaves = _leaves(skeleton)
    parameters = []
    for prefix, layer in leaves:
        shared = {}
        for name, p in layer.named_parameters(recurse=False):
            value = fixed[prefix + name] if fixed is not None else p.detach()
            shared[name] = share(value, *parties, crypto_provider=crypto_provider, precision=precision)
        parameters.append(shared)
    return SharedModule([layer for _, layer in leaves], parameters)
