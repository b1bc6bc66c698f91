"""``aiosyft demo``: pointer tensors on virtual workers, each result checked against PyTorch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F  # noqa: N812

import actors


async def demo() -> None:
    torch.manual_seed(0)
    async with actors.VirtualWorker("bob") as bob, actors.VirtualWorker("alice") as alice:
        x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        x_ptr = actors.send(x, bob)
        print(f"sent a tensor to bob: {x_ptr!r}")

        y_ptr = torch.sigmoid(x_ptr @ x_ptr.t() + 1).sum(dim=0)  # five commands, no waiting
        print(f"pipelined five operations: {y_ptr!r} (not resolved yet)")
        await y_ptr
        print(f"resolved: shape={tuple(y_ptr.shape)} dtype={y_ptr.dtype}")
        y = await y_ptr.get()
        expected = torch.sigmoid(x @ x.t() + 1).sum(dim=0)
        print(f"got {y.tolist()}; plain PyTorch gives {expected.tolist()}")
        assert torch.equal(y, expected)

        z_ptr = (x_ptr * 10).move(alice)  # bob sends it to alice directly
        print(f"moved bob -> alice worker to worker: {z_ptr!r}")
        assert torch.equal(await (z_ptr - 1).get(), x * 10 - 1)

        model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        reference = copy.deepcopy(model)
        target = torch.tensor([[1.0], [-1.0]])
        actors.send(model, bob)
        optimizer = actors.RemoteOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
        data, labels = x_ptr, actors.send(target, bob)
        for _ in range(5):
            optimizer.zero_grad()
            F.mse_loss(model(data), labels).backward()
            optimizer.step()
        await actors.get(model)

        local_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(5):
            local_optimizer.zero_grad()
            F.mse_loss(reference(x), target).backward()
            local_optimizer.step()
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
        print(f"5 SGD steps on bob, model fetched back: identical to local training: {same}")
        assert same
        del x_ptr, y_ptr, z_ptr, data, labels, optimizer
        print(f"bob holds {(await bob.ping())['objects']} objects after the pointers were dropped")
