"""Sharing data where it lives: its owner's worker splits it and sends each party its share.

The leader names the parties; the worker holding the data (a published dataset, or anything
computed from it) draws the shares with the secure generator and sends each party only its
own, worker to worker. What leaves is in form :data:`~mpc.release.SHARE`, so the owner's
policy lets it go only to the parties its *shares* release names; the leader receives nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.context import Context
from actors.policy import RAW, converted
from actors.registry import command
from mpc.opening import check_ring
from mpc.provider import COMMAND_SET
from mpc.release import SHARE
from mpc.ring import split
from protocol import BadArguments


@command("mpc.share_from", command_set=COMMAND_SET, kind="flow")
async def share_from(ctx: Context, *values: Any, owner: str, parties: list[str]) -> torch.Tensor | None:
    """On ``owner``: split ``values[0]`` and send share ``i`` to party ``i`` (keeping its own if
    it is one). On a party: its share. The data's raw form becomes the share form here, and
    only here."""
    if not isinstance(parties, list) or len(parties) < 2 or len(set(parties)) != len(parties):
        raise BadArguments("share among two or more distinct parties")
    if ctx.me == owner:
        if len(values) != 1:
            raise BadArguments("the owner's part takes the value to share")
        secret = check_ring("value", values[0])
        ctx.label = converted(ctx.label, {RAW: SHARE})  # the declassification point of this release
        mine = None
        for party, piece in zip(parties, split(secret, len(parties)), strict=True):
            if party == ctx.me:
                mine = piece
            else:
                ctx.send(party, "share", piece)
        return mine
    if values:
        raise BadArguments("a party's part takes no value: its share comes from the owner")
    if ctx.me not in parties:
        raise BadArguments(f"{ctx.me} is not one of the parties {parties}")
    share = await ctx.recv(owner, "share")
    return check_ring("share", share)
