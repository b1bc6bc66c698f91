"""The crypto provider: correlated randomness for the parties, made without seeing any data.

For a Beaver multiplication the parties need additive shares of random ``a``, ``b`` and
``c = a * b`` (or ``a @ b``, ``conv2d(a, b)``); for truncation with more than two parties, shares
of a random ``r`` and of ``r >> f``. The provider makes them in one flow per request:

* party ``i < n - 1`` gets a 16-byte seed and expands all its shares from it (:func:`ring.expand`);
* the last party gets a seed for its shares of the inputs and its share of the product
  explicitly (the one correction: the product is not a function of its seed).

So the provider sends ``16 (n - 1)`` bytes plus one tensor the size of the product, instead of
three tensors per party. It learns shapes and nothing else: it never receives data, shares of
data or openings. Each party's part of the run (:func:`receive_material`) returns its material
as one object, which the protocol commands then take as an argument: the leader may ask for
material long before it is needed (the online phase then never waits for the provider), or
together with the operation (the provider works while the parties' commands arrive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from actors.context import Context
from actors.registry import command
from mpc.ring import SEED_BYTES, check_shift, expand, new_seed
from protocol import BadArguments

#: The set parties serve (``aiosyft worker --enable mpc``) and the one providers serve.
COMMAND_SET = "mpc"
PROVIDER_SET = "provider"
#: Largest number of ring elements one request may ask for (8 GiB of int64 per tensor).
MAX_ELEMENTS = 2**30


#: kind -> how the product is made from the two random inputs.
PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "mul": lambda a, b, _: a * b,
    "matmul": lambda a, b, _: a @ b,
}


def material_shapes(kind: str, shapes: Sequence[Sequence[int]], options: dict[str, Any]) -> list[list[int]]:
    """The shapes of one party's material: the inputs', then the product's (or ``r``'s twice)."""
    if kind not in PRODUCTS and kind != "trunc":
        raise BadArguments(f"unknown material kind {kind!r}; known: {', '.join([*PRODUCTS, 'trunc'])}")
    if kind == "trunc":
        if len(shapes) != 1:
            raise BadArguments("truncation material takes one shape")
        return [list(shapes[0]), list(shapes[0])]
    if len(shapes) != 2:
        raise BadArguments(f"{kind} material takes two input shapes")
    metas = [torch.empty(tuple(s), dtype=torch.int64, device="meta") for s in shapes]
    try:
        product = PRODUCTS[kind](metas[0], metas[1], options).shape
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadArguments(f"{kind} of shapes {list(shapes[0])} and {list(shapes[1])}: {exc}") from exc
    return [list(shapes[0]), list(shapes[1]), list(product)]


def _check_request(kind: str, shapes: Any, options: Any) -> list[list[int]]:
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes
    ):
        raise BadArguments("shapes must be lists of non-negative integers")
    if not isinstance(options, dict):
        raise BadArguments("options must be a map")
    if kind == "trunc":
        check_shift(options.get("precision"))
    out = material_shapes(kind, shapes, {k: v for k, v in options.items() if k != "precision"})
    if any(torch.Size(s).numel() > MAX_ELEMENTS for s in out):
        raise BadArguments(f"material of more than {MAX_ELEMENTS} elements per tensor is refused")
    return out


@command("provider.material", command_set=PROVIDER_SET, kind="flow")
async def make_material(
    ctx: Context, kind: str, shapes: list[list[int]], parties: list[str], options: dict[str, Any]
) -> None:
    """The provider's half: every party's seed goes out first (each expands its part while the
    provider works), then the last party's share of the product. Keeps nothing."""
    out = _check_request(kind, shapes, options)
    if not isinstance(parties, list) or len(parties) < 2 or ctx.me in parties:
        raise BadArguments("material is for two or more parties, the provider not among them")
    seeds = [new_seed() for _ in parties]
    for party, seed in zip(parties, seeds, strict=True):
        ctx.send(party, "seed", seed)
    inputs = out[:-1]  # the shapes every party expands; the others add the product's share
    totals: list[torch.Tensor] = []
    correction = torch.zeros(out[-1], dtype=torch.int64)
    for i, seed in enumerate(seeds):
        mine = expand(seed, inputs if i == len(seeds) - 1 else out)
        if i == 0:
            totals = list(mine[: len(inputs)])
        else:
            for total, part in zip(totals, mine, strict=False):
                total.add_(part)
        if i < len(seeds) - 1:
            correction.add_(mine[-1])
    if kind == "trunc":
        target = totals[0].bitwise_right_shift_(options["precision"])  # shares of r and of r >> f
    else:
        target = PRODUCTS[kind](totals[0], totals[1], {k: v for k, v in options.items() if k != "precision"})
    ctx.send(parties[-1], "product", target.sub_(correction))


@command("mpc.material", command_set=COMMAND_SET, kind="flow")
async def receive_material(  # noqa: PLR0917 - one flow's fixed arguments
    ctx: Context, kind: str, shapes: list[list[int]], provider: str, last: bool, options: dict[str, Any]
) -> Material:
    """A party's half: its material, ``[a, b, c]`` (``[r, r >> f]`` for truncation), single use."""
    out = _check_request(kind, shapes, options)
    tensors = await receive_part(ctx, provider, out, last=last)
    if tensors[-1] is None:
        tensors[-1] = await receive_product(ctx, provider, out[-1])
    return Material(kind, tensors)  # type: ignore[arg-type]


async def receive_part(
    ctx: Context, provider: str, shapes: list[list[int]], *, last: bool
) -> list[torch.Tensor | None]:
    """This party's material from its seed; the last party's final tensor is ``None`` until
    :func:`receive_product` brings it (the provider sends it once it is made)."""
    seed = await ctx.recv(provider, "seed")
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise BadArguments(f"a material seed is {SEED_BYTES} bytes")
    if not last:
        return list(expand(seed, shapes))
    return [*expand(seed, shapes[:-1]), None]


async def receive_product(ctx: Context, provider: str, shape: list[int]) -> torch.Tensor:
    product = await ctx.recv(provider, "product")
    if not isinstance(product, torch.Tensor) or product.dtype != torch.int64 or list(product.shape) != shape:
        raise BadArguments(f"the provider's share should be int64 of shape {shape}")
    return product


class Material:
    """One party's part of one operation's correlated randomness, as :func:`receive_material`
    made it from the provider's messages. No message can carry one (the codec knows no such
    type), so a protocol's material always comes from a provider, never from the leader: a
    leader passing zeros as a "triple" would have the parties open their inputs unmasked."""

    __slots__ = ("kind", "tensors")

    def __init__(self, kind: str, tensors: list[torch.Tensor]) -> None:
        self.kind = kind
        self.tensors: list[torch.Tensor] | None = tensors

    def __repr__(self) -> str:
        state = "used" if self.tensors is None else f"{len(self.tensors)} tensors"
        return f"<Material {self.kind}: {state}>"


def take(material: Any, kind: str, size: int) -> list[torch.Tensor]:
    """The tensors of one party's material, which is used up: a triple used twice would let the
    parties subtract two openings and learn the difference of two secrets."""
    if not isinstance(material, Material):
        raise BadArguments(f"{kind} needs material made by a crypto provider (mpc.material), "
                           f"not a {type(material).__name__}")  # fmt: skip
    if material.tensors is None:
        raise BadArguments(f"this {material.kind} material was used already: material is single use")
    if material.kind != kind or len(material.tensors) != size:
        raise BadArguments(f"{kind} needs {kind} material, got {material.kind}")
    tensors, material.tensors = material.tensors, None
    return tensors


__all__ = [
    "COMMAND_SET",
    "PROVIDER_SET",
    "make_material",
    "material_shapes",
    "Material",
    "receive_material",
    "receive_part",
    "receive_product",
    "take",
]
