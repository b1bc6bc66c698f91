"""Models trained on remote workers, step for step against the same training done locally.

The remote model is a ``deepcopy`` of the local one taken before anything runs, both see the same
data, and their parameters, buffers and gradients are compared with ``torch.equal``: the worker
runs the very same PyTorch kernels, so remote training is bit-for-bit local training.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name everyone reads
from torch import nn

import actors
from actors.pointer import ObjectPointer, PointerTensor
from protocol import CommandNotAllowed


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def regression_data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randn(n, 3, generator=generator)


class Tied(nn.Module):
    """An autoencoder-like module whose two layers share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x: Any) -> Any:
        return self.dec(torch.tanh(self.enc(x)))


async def held(worker: actors.RemoteWorker) -> int:
    await asyncio.sleep(0)  # dropped pointers' deletes leave on the next turn
    status = await worker.ping()
    return int(status["objects"])


def assert_same_state(remote: nn.Module, local: nn.Module) -> None:
    """Parameters and buffers equal, bit for bit, and local again (no pointer left)."""
    remote_state, local_state = remote.state_dict(), local.state_dict()
    assert list(remote_state) == list(local_state)
    for name, value in local_state.items():
        got = remote_state[name]
        assert isinstance(got, torch.Tensor) and not isinstance(got, PointerTensor), name
        assert got.dtype == value.dtype, name
        assert torch.equal(got, value), (name, (got - value).abs().max())
    for parameter in remote.parameters():
        assert isinstance(parameter, nn.Parameter)


def local_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any) -> torch.Tensor:
    optimizer.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def remote_step(model: nn.Module, optimizer: actors.RemoteOptimizer, x: Any, y: Any) -> Any:
    """The same lines as :func:`local_step`: nothing in a training step needs an ``await``."""
    optimizer.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


async def test_one_sgd_step_matches_local(bob):
    X, Y = regression_data()
    local = mlp()
    remote = copy.deepcopy(local)
    assert actors.send(remote, bob) is remote
    assert all(isinstance(p, PointerTensor) and p.location is bob for p in remote.parameters())
    xp, yp = actors.send(X, bob), actors.send(Y, bob)
    out = remote(xp)
    assert isinstance(out, PointerTensor) and out.location is bob
    await out  # a forward pass is remote and lands on bob
    assert out.shape == torch.Size([32, 3])
    del out

    local_loss = local_step(local, torch.optim.SGD(local.parameters(), lr=0.1), X, Y)
    remote_loss = remote_step(
        remote, actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), lr=0.1), xp, yp
    )
    assert torch.equal(await remote_loss.get(), local_loss.detach())

    assert await held(bob) == 6 + 2  # the parameters and the data; the step's temporaries are gone
    assert await actors.get(remote) is remote
    assert_same_state(remote, local)
    assert not torch.equal(remote[0].weight, mlp()[0].weight)  # the step did change the weights
    assert await held(bob) == 2
    del xp, yp


@pytest.mark.parametrize(
    ("optimizer", "hyper"),
    [
        (torch.optim.SGD, {"lr": 0.05}),
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.Adam, {"lr": 0.01}),
    ],
    ids=["sgd", "sgd-momentum", "adam"],
)
async def test_several_steps_match_local(bob, optimizer, hyper):
    X, Y = regression_data()
    local = mlp()
    remote = actors.send(copy.deepcopy(local), bob)
    local_opt = optimizer(local.parameters(), **hyper)
    remote_opt = actors.RemoteOptimizer(optimizer, remote.parameters(), **hyper)
    xp, yp = actors.send(X, bob), actors.send(Y, bob)
    local_losses, remote_losses = [], []
    for _ in range(5):
        local_losses.append(local_step(local, local_opt, X, Y).item())
        remote_losses.append(remote_step(remote, remote_opt, xp, yp).item())
    values = await asyncio.gather(*(loss.get() for loss in remote_losses))
    assert values == local_losses
    assert local_losses[-1] < local_losses[0]  # it is training
    await actors.get(remote)
    assert_same_state(remote, local)
    for got, expected in zip(remote.parameters(), local.parameters(), strict=True):
        assert torch.equal(got.grad, expected.grad)  # the last step's gradients came home too
    del remote_opt, xp, yp


async def check_gradients_come_back_with_get(bob):
    X, Y = regression_data()
    local = mlp()
    remote = actors.send(copy.deepcopy(local), bob)
    F.mse_loss(local(X), Y).backward()
    F.mse_loss(remote(actors.send(X, bob)), actors.send(Y, bob)).backward()

    grad = remote[0].weight.grad  # a pointer to the remote gradient
    assert torch.equal(await grad.get(), local[0].weight.grad)
    await actors.get(remote)
    for (name, got), expected in zip(remote.named_parameters(), local.parameters(), strict=True):
        assert got.grad is not None, name
        assert torch.equal(got.grad, expected.grad), name
    assert_same_state(remote, local)  # backward alone changed no weight


async def check_zero_grad_clears_remote_gradients(bob):
    remote = actors.send(mlp(), bob)
    optimizer = actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), lr=0.1)
    remote(actors.send(torch.ones(2, 6), bob)).sum().backward()
    assert torch.equal(await remote[4].bias.grad.get(), torch.full((3,), 2.0))
    optimizer.zero_grad()
    assert await remote[4].bias.grad.get() is None
    optimizer.zero_grad()  # no gradient to zero: stays None, no error
    await actors.get(remote)
    assert all(p.grad is None for p in remote.parameters())
    del optimizer


async def test_gradients_come_back_and_zero_grad_clears_them(bob):
    await check_gradients_come_back_with_get(bob)
    await check_zero_grad_clears_remote_gradients(bob)


async def test_batchnorm_buffers_update_remotely_like_locally(bob):
    X, Y = regression_data()
    torch.manual_seed(3)
    local = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3))
    remote = actors.send(copy.deepcopy(local), bob)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    remote_opt = actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), lr=0.1)
    xp, yp = actors.send(X, bob), actors.send(Y, bob)
    for _ in range(3):
        local_step(local, local_opt, X, Y)
        remote_step(remote, remote_opt, xp, yp)
    # Evaluation uses the running statistics that training accumulated remotely.
    local.eval()
    remote.eval()
    assert torch.equal(await remote(xp).get(), local(X).detach())
    await actors.get(remote)
    assert int(remote[0].num_batches_tracked) == 3
    assert not torch.equal(remote[0].running_mean, torch.zeros(6))
    assert_same_state(remote, local)
    del remote_opt, xp, yp


async def test_tied_weights_stay_tied(bob):
    X, _ = regression_data()
    torch.manual_seed(5)
    local = Tied()
    remote = actors.send(copy.deepcopy(local), bob)
    assert remote.enc.weight is remote.dec.weight  # one pointer, one remote tensor
    assert len(list(remote.parameters())) == len(list(local.parameters())) == 3
    assert await held(bob) == 3
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    remote_opt = actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), lr=0.1)
    xp = actors.send(X, bob)
    for _ in range(3):
        local_step(local, local_opt, X, X)
        remote_step(remote, remote_opt, xp, xp)
    await actors.get(remote)
    assert remote.enc.weight is remote.dec.weight
    assert_same_state(remote, local)
    del remote_opt, xp


@pytest.mark.parametrize("stateful", [False, True], ids=["sgd", "adam"])
async def test_model_moved_mid_training_keeps_matching_local(bob, alice, stateful):
    X, Y = regression_data()
    optimizer, hyper = (torch.optim.Adam, {"lr": 0.01}) if stateful else (torch.optim.SGD, {"lr": 0.05})
    local = mlp()
    remote = actors.send(copy.deepcopy(local), bob)
    local_opt = optimizer(local.parameters(), **hyper)
    remote_opt = actors.RemoteOptimizer(optimizer, remote.parameters(), **hyper)
    xp, yp = actors.send(X, bob), actors.send(Y, bob)
    local_losses, remote_losses = [], []
    for step in range(6):
        if step == 3:
            assert actors.move(remote, alice) is remote
            xp.move(alice)
            yp.move(alice)
            assert all(p.location is alice for p in remote.parameters())
            if stateful:  # rebuilt on alice; Adam's moments stay behind, as with a fresh Adam here
                local_opt = optimizer(local.parameters(), **hyper)
        local_losses.append(local_step(local, local_opt, X, Y).detach())
        remote_losses.append(remote_step(remote, remote_opt, xp, yp))
    assert [loss.location for loss in remote_losses] == [bob] * 3 + [alice] * 3
    step_handle = remote_opt.step()  # runs where the parameters are now
    local_opt.step()
    assert step_handle.location is alice
    del step_handle
    assert await held(bob) == 3  # the first three losses; parameters, data and optimizer left bob
    values = await asyncio.gather(*(loss.get() for loss in remote_losses))
    assert await held(bob) == 0
    for got, expected in zip(values, local_losses, strict=True):
        assert torch.equal(got, expected)
    await actors.get(remote)
    assert_same_state(remote, local)
    del remote_opt, xp, yp
    assert await held(alice) == 0


async def test_conv_net_step_matches_local(bob):
    torch.manual_seed(7)
    local = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    remote = actors.send(copy.deepcopy(local), bob)
    images = torch.randn(8, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.5)
    remote_opt = actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), lr=0.1, momentum=0.5)
    ip, lp = actors.send(images, bob), actors.send(labels, bob)
    for _ in range(2):
        local_opt.zero_grad()
        local_loss = F.cross_entropy(local(images), labels)
        local_loss.backward()
        local_opt.step()
        remote_opt.zero_grad()
        remote_loss = F.cross_entropy(remote(ip), lp)
        remote_loss.backward()
        remote_opt.step()
    assert torch.equal(await remote_loss.get(), local_loss.detach())
    await actors.get(remote)
    assert_same_state(remote, local)
    del remote_opt, ip, lp


async def check_model_api_misuse_is_refused(bob, alice):
    remote = actors.send(mlp(), bob)
    with pytest.raises(ValueError, match="already on bob"):
        actors.send(remote, alice)
    with pytest.raises(TypeError):
        actors.RemoteOptimizer(torch.optim.SGD, mlp().parameters(), lr=0.1)  # local parameters
    with pytest.raises(CommandNotAllowed):
        actors.RemoteOptimizer(torch.optim.LBFGS, remote.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="move it there first"):
        remote(actors.send(torch.ones(1, 6), alice))  # input and model on different workers
    with pytest.raises(TypeError):
        actors.get(mlp().state_dict())
    local = await actors.get(remote)
    assert all(type(p) is nn.Parameter for p in local.parameters())


async def test_hook_scenario(bob, alice):
    X, _ = regression_data(4)
    local = mlp()
    actors.hook_torch()
    try:
        x = X.send(bob)
        assert isinstance(x, PointerTensor) and x.location is bob
        model = copy.deepcopy(local)
        assert model.location is None
        assert model.send(bob) is model
        assert model.location is bob
        out = model(x)
        assert torch.equal(await out.get(), local(X).detach())
        assert model.move(alice) is model
        assert model.location is alice
        assert await model.get() is model
        assert model.location is None
        assert_same_state(model, local)
    finally:
        actors.unhook_torch()
    del x
    assert await held(bob) == 0
    assert await held(alice) == 0


async def test_hook_then_unhook_restores_torch():
    assert not hasattr(torch.Tensor, "send")
    assert not hasattr(nn.Module, "send")
    actors.hook_torch()
    try:
        actors.hook_torch()  # idempotent
        assert torch.Tensor.send is actors.send
        assert nn.Module.get is actors.get
        assert nn.Module.move is actors.move
        assert isinstance(vars(nn.Module)["location"], property)
    finally:
        actors.unhook_torch()
    assert not hasattr(torch.Tensor, "send")
    assert not hasattr(torch.ones(1), "send")
    for name in ("send", "get", "move", "location"):
        assert not hasattr(nn.Module, name), name
    actors.unhook_torch()  # nothing left to remove: no error
    assert not hasattr(torch.Tensor, "send")


async def check_optimizer_handle_is_an_object_pointer(bob):
    remote = actors.send(mlp(), bob)
    optimizer = actors.RemoteOptimizer(torch.optim.Adam, remote.parameters(), lr=0.01)
    step = optimizer.step()  # no gradients yet: Adam skips every parameter
    assert type(step) is ObjectPointer
    assert await step.get() is None
    before = [p.fetch() for p in remote.parameters()]
    assert all(
        torch.equal(a, b) for a, b in zip(await asyncio.gather(*before), mlp().parameters(), strict=True)
    )
    del optimizer
    await actors.get(remote)
    assert await held(bob) == 0


async def test_model_api(bob, alice):
    await check_model_api_misuse_is_refused(bob, alice)
    await check_optimizer_handle_is_an_object_pointer(bob)
