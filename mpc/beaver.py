"""Beaver multiplication: the product of two shared tensors in one round of openings.

With shares of a random triple ``(a, b, c = a ∘ b)`` from the provider (``∘`` is ``*``, ``@`` or
a convolution: anything bilinear), every party opens ``eps = x - a`` and ``delta = y - b`` to
every other party in ONE message, sums what it receives, and computes its share of
``x ∘ y = c + eps ∘ b + a ∘ delta + eps ∘ delta`` (the public last term is added by party 0
only). ``eps`` and ``delta`` are ``x`` and ``y`` masked by uniform ``a`` and ``b`` that no party
knows, so the openings reveal nothing about them. Fixed-point products carry twice the
fractional bits; :mod:`mpc.truncation` brings them back, in the same flow.

A party sends only masked openings, and only to the other parties of the run: never to the
leader, never to the provider, never its share.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.context import Context
from actors.registry import command
from mpc.opening import check_parties, check_ring, open_all
from mpc.provider import (
    COMMAND_SET,
    PRODUCTS,
    Material,
    material_shapes,
    receive_part,
    receive_product,
    take,
)
from mpc.truncation import truncate
from protocol import BadArguments


@command("mpc.beaver", command_set=COMMAND_SET, kind="flow")
async def beaver(
    ctx: Context,
    x: torch.Tensor,
    y: torch.Tensor,
    material: Material | None = None,
    *,
    op: str,
    parties: list[str],
    precision: int | None = None,
    trunc: Material | None = None,
    options: dict[str, Any] | None = None,
    provider: str | None = None,
) -> torch.Tensor:
    """This party's share of ``x ∘ y`` (truncated by ``precision`` bits if given).

    ``material`` made ahead, or none: then the ``provider`` is a party of this very run and its
    part arrives here (a seed at once; the last party's share of ``c`` when the provider has
    made it). The openings need only ``a`` and ``b``, so they go out while the provider is still
    working: the provider's time and the round overlap instead of adding up."""
    index = check_parties(ctx, parties)
    product = PRODUCTS.get(op)
    if product is None:
        raise BadArguments(f"unknown product {op!r}; known: {', '.join(PRODUCTS)}")
    x, y = check_ring("x", x), check_ring("y", y)
    options = options or {}
    c: torch.Tensor | None
    if material is not None:
        a, b, c = take(material, op, 3)
    elif provider is not None:
        shapes = material_shapes(op, [list(x.shape), list(y.shape)], options)
        a, b, c = await receive_part(ctx, provider, shapes, last=index == len(parties) - 1)
    else:
        raise BadArguments("beaver needs material made ahead, or the provider of this run")
    if a.shape != x.shape or b.shape != y.shape:
        raise BadArguments(
            f"the triple is for shapes {list(a.shape)} and {list(b.shape)}, "
            f"the operands are {list(x.shape)} and {list(y.shape)}"
        )
    eps, delta = await open_all(ctx, parties, "eps,delta", [x - a, y - b])
    if c is None:  # the last party's share of c: made by the provider meanwhile
        c = await receive_product(ctx, provider, shapes[-1])  # type: ignore[arg-type]
    if index == 0:
        a.add_(eps)  # eps ∘ delta once, by party 0: (a + eps) ∘ delta
    z = c  # the material is used up: its tensors are this flow's to overwrite
    if op == "mul" and z.shape == eps.shape == a.shape:
        z.addcmul_(eps, b).addcmul_(a, delta)
    else:
        z = z + product(eps, b, options)
        z.add_(product(a, delta, options))
    if precision is None:
        return z
    return await truncate(ctx, z, precision, parties, index, trunc)
