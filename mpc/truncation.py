"""Truncation of shared fixed-point values: from ``2f`` back to ``f`` fractional bits.

In real terms, with ``f = 16`` a product of value ``v`` carries ``v * 2^32`` before truncation,
so the large error has probability about ``|v| / 2^31``: 4e-7 at 900, 5% at 1e8. Keep values at
the scale of machine learning (normalized inputs, small weights), or use fewer fractional bits.

* **Two parties** (SecureML): each truncates its own share, party 0 ``z0 >> f``, party 1
  ``-((-z1) >> f)``. No communication. The result is off by at most one unit in the last place,
  except with probability about ``|x| / 2^63`` per element, when the shares straddle the wrap
  and the result is off by about ``2^(64 - f)`` (for ``|x| < 2^40``: below ``2^-23``).
* **More parties** (local truncation is wrong there): the provider deals shares of a random
  ``r`` and of ``r >> f``; the parties open ``x - r`` (one round), and the result is
  ``((x - r) >> f) + 1`` (added by party 0) plus the shares of ``r >> f``: ``floor(x / 2^f)`` or
  one more, with mean exactly ``x / 2^f`` (without the ``+ 1`` the two floors lose half a unit
  on average, and a sum of 32 truncated values drifts by 16 units: enough to steer training).
  Off by about ``2^(64 - f)`` instead with probability about ``|x| / 2^63`` (when ``x - r``
  leaves the int64 range). The provider dealt the shares of ``r >> f``, so every party but the
  first re-masks its result with fresh randomness it sends party 0 along with its opening (no
  extra round): the provider knows no party's share of the result.
"""

from __future__ import annotations

import torch

from actors.context import Context
from actors.registry import command
from mpc.opening import check_parties, check_ring, open_all
from mpc.provider import COMMAND_SET, Material, take
from mpc.ring import check_shift, random_ring, truncate_share, truncate_share_
from protocol import BadArguments


async def truncate(  # noqa: PLR0917 - one private caller per protocol
    ctx: Context, z: torch.Tensor, precision: int, parties: list[str], index: int,
    material: Material | None,
) -> torch.Tensor:  # fmt: skip
    check_shift(precision)
    if len(parties) == 2:
        return truncate_share_(z, precision, index)
    if material is None:
        raise BadArguments(f"truncation among {len(parties)} parties needs the provider's [r, r >> f]")
    r, shifted = take(material, "trunc", 2)
    if r.shape != z.shape or shifted.shape != z.shape:
        raise BadArguments(f"truncation material must be of shape {list(z.shape)}")
    if index != 0:  # re-mask: the provider dealt this share of r >> f, so it would know ours
        mask = random_ring(z.shape)
        ctx.send(parties[0], "remask", mask)  # leaves with the opening, in the same message
    (masked,) = await open_all(ctx, parties, "x-r", [z - r])
    if index != 0:
        return shifted.sub_(mask)
    for party in parties[1:]:
        shifted.add_(check_ring("remask", await ctx.recv(party, "remask")))
    return shifted.add_(masked.bitwise_right_shift_(precision).add_(1))  # +1: unbiased (see above)


@command("mpc.truncate_shared", command_set=COMMAND_SET, kind="flow")
async def truncate_flow(
    ctx: Context,
    z: torch.Tensor,
    *,
    precision: int,
    parties: list[str],
    trunc: Material | None = None,
) -> torch.Tensor:
    """Truncate one shared value on its own (after a product by a public fixed-point number)."""
    index = check_parties(ctx, parties)
    return await truncate(ctx, check_ring("z", z), precision, parties, index, trunc)


@command("mpc.truncate_share", command_set=COMMAND_SET, context=False)
def truncate_local(share: torch.Tensor, precision: int, index: int) -> torch.Tensor:
    """Two-party truncation of this party's own share (see the module docstring)."""
    check_ring("share", share)
    check_shift(precision)
    if index not in (0, 1):
        raise BadArguments("local truncation is for two parties: index 0 or 1")
    return truncate_share(share, precision, index)
