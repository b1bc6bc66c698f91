"""What every protocol does the same way: who this party is in the run, what a share must be,
and opening values to the other parties (one message to each, summed on arrival).

An opening is sent only to the run's other parties, as the flow channel allows: never to the
leader or the provider. What is opened must already be masked; this module cannot tell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch

from actors.context import Context
from protocol import BadArguments


def check_parties(ctx: Context, parties: Any) -> int:
    """This party's index among ``parties`` (the run's parties in the leader's order)."""
    if not isinstance(parties, list) or len(parties) < 2 or not all(isinstance(p, str) for p in parties):
        raise BadArguments("parties is a list of two or more identities")
    if len(set(parties)) != len(parties) or ctx.me not in parties:
        raise BadArguments(f"{ctx.me} is not one of the parties {parties}")
    missing = [p for p in parties if p not in ctx.parties]
    if missing:
        raise BadArguments(f"parties {missing} were not started in this run")
    return parties.index(ctx.me)


def check_ring(name: str, value: Any) -> torch.Tensor:
    """``value`` if it is an int64 (ring) tensor; else ``BadArguments`` naming ``name``."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadArguments(f"{name}: expected an int64 (ring) tensor, got {kind}")
    return value


async def open_all(
    ctx: Context, parties: list[str], tag: str, values: list[torch.Tensor],
    add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Every party's ``values`` summed: one message to and one from each other party. ``add``
    sums in another ring than int64's (the wide ring of the authenticated mode)."""
    others = [p for p in parties if p != ctx.me]
    for party in others:
        ctx.send(party, tag, values)
    received = await asyncio.gather(*(ctx.recv(party, tag) for party in others))
    for party, theirs in zip(others, received, strict=True):
        if not isinstance(theirs, list) or len(theirs) != len(values):
            raise BadArguments(f"{party} opened {tag} with the wrong number of values")
        for mine, value in zip(values, theirs, strict=True):
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.shape != mine.shape:
                raise BadArguments(f"{party} opened {tag} with a value of the wrong kind or shape")
    if add is not None:
        sums = list(values)
        for theirs in received:
            sums = [add(total, value) for total, value in zip(sums, theirs, strict=True)]
        return sums
    # what was sent stays as it was (it may not have left yet): the sums are new tensors
    totals = [value + received[0][i] for i, value in enumerate(values)]
    for theirs in received[1:]:
        for total, value in zip(totals, theirs, strict=True):
            total.add_(value)
    return totals
