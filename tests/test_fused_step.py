"""``nn.sgd_step``, the walking model's fused step, against ``torch.optim.SGD`` on the module.

The step trains a flat parameter vector through a worker's standing copy of the model's shape
(transposed linear weights, a planned forward, one buffer); none of that may change a bit of the
result, for any layer the spec allows, on its own or over a worker.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actors
from actors.pointer import call
from privacy.federated import LOSSES, flat_parameters, load_flat, sgd_step, spec_key
from protocol import BadArguments
from protocol.modules import module_spec


def _models() -> dict[str, tuple[nn.Sequential, torch.Tensor, torch.Tensor, str]]:
    """Model, inputs, targets and loss; each model exercises another branch of the plan."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "mlp": (
            nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)),
            torch.randn(8, 13, generator=g), torch.randn(8, 1, generator=g), "mse",
        ),
        "no-bias-tanh-sigmoid": (
            nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 1), nn.Sigmoid()),
            torch.randn(6, 5, generator=g), torch.rand(6, 1, generator=g), "mse",
        ),
        "sequence-input": (  # a 3-D input: F.linear's general path, not addmm
            nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.1), nn.Linear(3, 2)),
            torch.randn(5, 6, 4, generator=g), torch.randn(5, 6, 2, generator=g), "mse",
        ),
        "conv": (
            nn.Sequential(nn.Conv2d(1, 2, 3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(8, 3)),
            torch.randn(4, 1, 4, 4, generator=g), torch.tensor([0, 2, 1, 2]), "cross_entropy",
        ),
        "logits": (
            nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)),
            torch.randn(8, 8, generator=g), torch.randint(0, 2, (8, 1), generator=g).float(), "bce_logits",
        ),
    }  # fmt: skip


MODELS = _models()


def _torch_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, lr: float, steps: int
) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = LOSSES[loss](model(x), y)
        value.backward()
        optimizer.step()
        values.append(value.detach())
    return values


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_steps_equal_torch_optim_sgd_bit_for_bit(name: str) -> None:
    model, x, y, loss = MODELS[name]
    key = spec_key(module_spec(model))
    flat = flat_parameters(model)
    fused = [sgd_step(key, flat, x, y, loss=loss, lr=0.05) for _ in range(3)]
    expected = _torch_steps(model, x, y, loss, 0.05, 3)
    for got, want in zip(fused, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(flat, flat_parameters(model))
    assert not fused[-1].requires_grad


def test_rows_select_the_batch_and_a_vector_that_requires_grad_is_still_updated_in_place() -> None:
    model, x, y, loss = MODELS["mlp"]
    key = spec_key(module_spec(model))
    flat = flat_parameters(model).requires_grad_(True)
    value = sgd_step(key, flat, torch.cat([x, x]), torch.cat([y, y]), loss=loss, lr=0.1, rows=slice(8, 16))
    (expected,) = _torch_steps(model, x, y, loss, 0.1, 1)
    assert torch.equal(value, expected)
    assert torch.equal(flat.detach(), flat_parameters(model))


def test_a_step_leaves_no_trace_between_models_of_the_same_shape() -> None:
    """Workers keep one standing copy per model shape; two models of that shape must not mix."""
    first, second = MODELS["mlp"][0], nn.Sequential(*[nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24),
                                                      nn.ReLU(), nn.Linear(24, 1)])  # fmt: skip
    key = spec_key(module_spec(first))
    assert key == spec_key(module_spec(second))
    _, x, y, _ = MODELS["mlp"]
    a, b = flat_parameters(first), flat_parameters(second)
    sgd_step(key, a, x, y, lr=0.1)
    sgd_step(key, b, x, y, lr=0.1)
    _torch_steps(first, x, y, "mse", 0.1, 1)
    _torch_steps(second, x, y, "mse", 0.1, 1)
    assert torch.equal(a, flat_parameters(first)) and torch.equal(b, flat_parameters(second))
    restored = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))
    load_flat(restored, b)
    assert all(torch.equal(p, q) for p, q in zip(restored.parameters(), second.parameters(), strict=True))


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda key, flat, x, y: (key, flat[:-1], x, y), r"has 1265 float32 parameters, got \(1264,\)"),
        (lambda key, flat, x, y: (key, flat.double(), x, y), r"float32 parameters, got \(1265,\)"),
        (lambda key, flat, x, y: (key, [1.0, 2.0], x, y), "float32 parameters, got list"),
        (lambda key, flat, x, y: (key[:-3], flat, x, y), "bad model spec"),
        (lambda key, flat, x, y: ([["Linear", {}]], flat, x, y), "JSON key"),
    ],
    ids=["short", "float64", "not-a-tensor", "bad-json", "not-a-key"],
)
def test_bad_arguments_are_refused_by_name(make_args, message) -> None:
    model, x, y, _ = MODELS["mlp"]
    args = make_args(spec_key(module_spec(model)), flat_parameters(model), x, y)
    with pytest.raises(BadArguments, match=message):
        sgd_step(*args)


def test_unknown_losses_and_layers_with_running_statistics_are_refused() -> None:
    model, x, y, _ = MODELS["mlp"]
    with pytest.raises(BadArguments, match="unknown loss 'hinge'"):
        sgd_step(spec_key(module_spec(model)), flat_parameters(model), x, y, loss="hinge")
    with_statistics = nn.Sequential(nn.Linear(13, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(BadArguments, match="running statistics"):
        sgd_step(spec_key(module_spec(with_statistics)), flat_parameters(with_statistics), x, y)


async def test_over_a_worker_the_step_matches_and_a_wrong_vector_fails_only_its_own_step(bob) -> None:
    model, x, y, loss = MODELS["mlp"]
    key = spec_key(module_spec(model))
    flat = actors.send(flat_parameters(model), bob)
    xp, yp = actors.send(x, bob), actors.send(y, bob)
    bad = call(bob, "nn.sgd_step", [key, actors.send(torch.zeros(3), bob), xp, yp], {"lr": 0.05})
    good = call(bob, "nn.sgd_step", [key, flat, xp, yp], {"loss": loss, "lr": 0.05})
    with pytest.raises(BadArguments, match=r"got \(3,\)"):
        await bad
    (expected,) = _torch_steps(model, x, y, loss, 0.05, 1)
    assert torch.equal(await good.get(), expected)
    assert torch.equal(await flat.get(), flat_parameters(model))
    del bad, xp, yp
