"""Models as data: the format in which a model crosses the wire.

Code never travels: a model crosses as a *spec*, a list of allowlisted layer names with their
constructor arguments, plus its state tensors, and the receiver rebuilds it from those. Only
``nn.Sequential`` stacks of the layers in :data:`LAYERS` can be described; anything else is
refused with the reason. This is the format only: what a worker does with a model (training
jobs, fused steps) belongs to the room that registers those commands (``privacy.federated``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from protocol.errors import BadArguments

#: Layer name -> (class, constructor arguments read back from an instance).
LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "bias")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "Dropout": (nn.Dropout, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Identity": (nn.Identity, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "ReLU": (nn.ReLU, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "Tanh": (nn.Tanh, ()),
}
_NAME_OF_LAYER = {cls: name for name, (cls, _) in LAYERS.items()}


def _argument(layer: nn.Module, name: str) -> Any:
    if name == "bias":
        return layer.bias is not None  # type: ignore[union-attr]
    value = getattr(layer, name)
    return tuple(value) if isinstance(value, list) else value


def module_spec(module: nn.Module) -> list[list[Any]]:
    """``module`` as ``[[layer name, {argument: value}], ...]``; TypeError if it cannot be."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    spec = []
    for layer in layers:
        name = _NAME_OF_LAYER.get(type(layer))
        if name is None:
            raise TypeError(
                f"{type(layer).__name__} cannot be described for a remote job: use nn.Sequential of "
                f"{', '.join(LAYERS)}"
            )
        spec.append([name, {arg: _argument(layer, arg) for arg in LAYERS[name][1]}])
    return spec


def build_module(spec: Any) -> nn.Sequential:
    """The module a spec describes (fresh parameters; load a state into it)."""
    if not isinstance(spec, list):
        raise BadArguments("a module spec is a list of [layer name, arguments]")
    layers = []
    for entry in spec:
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise BadArguments(f"bad layer entry {entry!r}")
        name, arguments = entry
        known = LAYERS.get(name) if isinstance(name, str) else None
        if known is None:
            raise BadArguments(f"layer {name!r} is not allowed in a module spec")
        cls, allowed = known
        if not set(arguments) <= set(allowed):
            raise BadArguments(f"{name} takes {allowed}, got {sorted(arguments)}")
        layers.append(cls(**arguments))
    return nn.Sequential(*layers)


def load_state(module: nn.Module, state: Any) -> None:
    """Copy ``state`` (tensors in ``state_dict`` order) into ``module``."""
    keys = list(module.state_dict())
    if not isinstance(state, list | tuple) or len(state) != len(keys):
        raise BadArguments(f"the model has {len(keys)} state tensors, got {len(state)}")
    module.load_state_dict(dict(zip(keys, state, strict=True)))
