"""Convolution and average pooling on shares.

A convolution is bilinear in its input and its kernel, so a shared convolution is a Beaver
product (:mod:`mpc.beaver`) whose triple is ``c = conv2d(a, b)``. torch has no int64
convolution on CPU; :func:`conv2d_ring` is im2col (``Tensor.unfold``, a view) and one int64
``tensordot``, which wraps mod 2^64 like every ring operation.

Average pooling, the paper's replacement for max pooling, is linear: each party sums its own
windows and the public ``1 / k^2`` multiplies (a fixed-point product, truncated), no round for
two parties.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from actors.registry import command
from mpc.opening import check_ring
from mpc.provider import COMMAND_SET, PRODUCTS
from protocol import BadArguments


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def conv2d_ring(
    x: torch.Tensor, w: torch.Tensor, stride: Any = 1, padding: Any = 0, **_: Any
) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding)`` for int64 (or meta) tensors,
    ``x`` of shape (N, C, H, W) and ``w`` of shape (O, C, kh, kw)."""
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"conv2d takes (N, C, H, W) and (O, C, kh, kw), got {list(x.shape)} and {list(w.shape)}"
        )
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    kh, kw = w.shape[2], w.shape[3]
    windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H', W', kh, kw)
    out = torch.tensordot(windows, w, dims=([1, 4, 5], [1, 2, 3]))  # (N, H', W', O)
    return out.permute(0, 3, 1, 2).contiguous()


def sum_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> torch.Tensor:
    """The sum of each window (int64 or meta): average pooling before its public division."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    return x.unfold(2, kh, sh).unfold(3, kw, sw).sum(dim=(-2, -1))


PRODUCTS["conv2d"] = lambda a, b, options: conv2d_ring(a, b, **options)


@command("mpc.conv2d", command_set=COMMAND_SET, context=False)
def conv2d_public(
    share: torch.Tensor, weight: torch.Tensor, stride: Any = 1, padding: Any = 0
) -> torch.Tensor:
    """A share convolved with a public kernel (already encoded): no communication."""
    check_ring("share", share)
    check_ring("weight", weight)
    try:
        return conv2d_ring(share, weight, stride=stride, padding=padding)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BadArguments(f"mpc.conv2d: {exc}") from exc


@command("mpc.sum_pool2d", command_set=COMMAND_SET, context=False)
def sum_pool(share: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> torch.Tensor:
    check_ring("share", share)
    if share.dim() != 4:
        raise BadArguments(f"pooling takes (N, C, H, W), got {list(share.shape)}")
    try:
        return sum_pool2d(share, kernel_size, stride, padding)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BadArguments(f"mpc.sum_pool2d: {exc}") from exc
