"""The command allowlist: what a remote worker runs, and everything it refuses to run."""

import builtins
import os

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name the wire uses

from protocol.allowlist import COMMANDS, TENSOR_ATTRIBUTES, lookup, name_of
from protocol.errors import BadArguments, CommandNotAllowed

UNKNOWN_NAMES = [
    "torch.load",
    "torch.save",
    "torch.from_file",
    "Tensor.set_",
    "Tensor.data_ptr",
    "Tensor.storage",
    "os.system",
    "builtins.eval",
    "eval",
    "__import__",
    "",
    "torch.add ",
    "TORCH.ADD",
    "torch.nn.functional.relu",  # F.relu is the one spelling
    "Tensor",
    "torch",
]


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_unknown_name_is_refused_and_named(name):
    with pytest.raises(CommandNotAllowed) as caught:
        lookup(name)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize("op", [5, None, ["torch.add"], ("torch.add",), b"torch.add", {"torch.add": 1}])
def test_non_string_names_are_refused(op):
    """The wire can carry any value as the op; only a str can name a command."""
    with pytest.raises(CommandNotAllowed) as caught:
        lookup(op)
    assert repr(op) in str(caught.value)


def test_str_subclass_is_not_a_name():
    class Sneaky(str):
        __slots__ = ()

    with pytest.raises(CommandNotAllowed):
        lookup(Sneaky("torch.add"))


def test_every_command_resolves_to_a_callable():
    assert COMMANDS
    for name in COMMANDS:
        assert callable(lookup(name)), name


DANGEROUS = (
    "load save from_file set_ as_strided as_strided_ resize_ resize_as_ share_memory_ data_ptr storage "
    "untyped_storage storage_offset apply_ map_ map2_ manual_seed seed set_rng_state get_rng_state "
    "set_default_dtype set_default_tensor_type set_default_device set_num_threads set_printoptions "
    "register_hook register_post_accumulate_grad_hook __reduce_ex__ __setstate__ __setattr__ "
    "__delattr__ numpy pin_memory cuda"
).split()


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_operations_are_absent_under_every_prefix(name):
    for prefix in ("torch.", "Tensor.", "F.", "optim.", "Optimizer.", ""):
        with pytest.raises(CommandNotAllowed):
            lookup(prefix + name)


def test_no_command_is_a_dangerous_function_under_another_name():
    """An alias must not smuggle in what the names above keep out."""
    names = [*DANGEROUS, "system", "eval", "exec", "open", "getattr", "setattr", "__import__", "compile"]
    dangerous = {
        id(fn)
        for source in (torch, torch.Tensor, F, os, builtins)
        for name in names
        if (fn := getattr(source, name, None)) is not None
    }
    assert dangerous, "the test found nothing to look for"
    leaked = [name for name, fn in COMMANDS.items() if id(fn) in dangerous]
    assert leaked == []


def test_lookup_runs_the_torch_function():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    assert torch.equal(lookup("torch.add")(a, b, alpha=2), torch.add(a, b, alpha=2))
    assert torch.equal(lookup("Tensor.sum")(b), b.sum())
    assert torch.equal(lookup("F.relu")(torch.tensor([-1.0, 3.0])), F.relu(torch.tensor([-1.0, 3.0])))
    assert torch.equal(lookup("Tensor.__getitem__")(b, 1), b[1])
    assert lookup("getitem")([7, 8], 1) == 8


def test_name_of_gives_the_wire_names():
    assert name_of(torch.add) == "torch.add"
    assert name_of(F.relu) == "F.relu"
    assert name_of(torch.optim.SGD) == "optim.SGD"
    assert name_of(torch.Tensor.add) == "Tensor.add"
    assert name_of(torch.Tensor.__add__) == "Tensor.__add__"


def test_name_of_and_lookup_agree_for_every_named_function():
    """What ``__torch_function__`` dispatch names is what the worker then runs."""
    named = 0
    for name, fn in COMMANDS.items():
        try:
            wire = name_of(fn)
        except CommandNotAllowed:
            continue
        assert lookup(wire) is fn, (name, wire)
        named += 1
    assert named > len(COMMANDS) // 2


def _unlisted():
    return None


@pytest.mark.parametrize(
    "fn",
    [_unlisted, torch.load, torch.save, torch.Tensor.set_, torch.manual_seed, os.system, print, lambda: 1],
    ids=lambda f: getattr(f, "__qualname__", repr(f)),
)
def test_name_of_unlisted_function_is_refused(fn):
    with pytest.raises(CommandNotAllowed) as caught:
        name_of(fn)
    assert fn.__qualname__ in str(caught.value)


@pytest.mark.parametrize("fn", [["a"], {"a": 1}, None, 5])
def test_name_of_non_function_is_refused(fn):
    with pytest.raises(CommandNotAllowed):
        name_of(fn)


@pytest.mark.parametrize("attribute", sorted(TENSOR_ATTRIBUTES))
@pytest.mark.parametrize("obj", [5, "tensor", [1.0, 2.0], None, torch.nn.Linear(2, 2), object()], ids=repr)
def test_tensor_attribute_getters_refuse_non_tensors(attribute, obj):
    """``Tensor.shape`` through the allowlist must not become a generic getattr."""
    with pytest.raises(BadArguments):
        lookup(f"Tensor.{attribute}")(obj)


def test_tensor_attribute_getters_read_tensors():
    z = torch.tensor([[1 + 2j, 3 - 1j]], requires_grad=True)
    z.grad = torch.tensor([[0.5 + 0j, 1j]])
    assert torch.equal(lookup("Tensor.real")(z), z.real)
    assert torch.equal(lookup("Tensor.imag")(z), z.imag)
    assert torch.equal(lookup("Tensor.mH")(z), z.mH)
    assert torch.equal(lookup("Tensor.T")(z), z.T)
    assert torch.equal(lookup("Tensor.grad")(z), z.grad)
    assert lookup("Tensor.shape")(z) == (1, 2)
    assert lookup("Tensor.dtype")(z) is torch.complex64
    assert lookup("Tensor.ndim")(z) == 2
    assert lookup("Tensor.requires_grad")(z) is True
    assert lookup("Tensor.is_leaf")(z) is True


def test_set_grad():
    p = torch.zeros(2, requires_grad=True)
    lookup("Tensor.set_grad")(p, torch.ones(2))
    assert torch.equal(p.grad, torch.ones(2))
    with pytest.raises(BadArguments):
        lookup("Tensor.set_grad")([0.0, 0.0], torch.ones(2))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_optimizer_constructor_builds_from_a_list_of_tensors(name):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = lookup(f"optim.{name}")([w], lr=0.1)
    assert type(opt) is getattr(torch.optim, name)
    assert opt.param_groups[0]["params"][0] is w
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    "params",
    [
        torch.ones(2, requires_grad=True),  # a tensor is iterable, but not a parameter list
        "weights",
        None,
        5,
        [torch.ones(2), "not a tensor"],
        [[torch.ones(2)]],
        {"params": [torch.ones(2)]},
        iter([torch.ones(2)]),
    ],
    ids=repr,
)
def test_optimizer_constructor_rejects_anything_but_a_tensor_list(params):
    with pytest.raises(BadArguments):
        lookup("optim.SGD")(params, lr=0.1)


def test_optimizer_step_and_zero_grad_match_torch():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    reference = torch.nn.Parameter(w.detach().clone())
    for p in (w, reference):
        p.grad = torch.tensor([0.5, 0.25, -1.0])
    opt = lookup("optim.SGD")([w], lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    for _ in range(3):
        lookup("Optimizer.step")(opt)
        ref_opt.step()
    assert torch.equal(w.detach(), reference.detach())
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0]))
    lookup("Optimizer.zero_grad")(opt, False)
    assert torch.equal(w.grad, torch.zeros(3))
    lookup("Optimizer.zero_grad")(opt)
    assert w.grad is None


@pytest.mark.parametrize("obj", [None, 5, torch.ones(2), torch.nn.Linear(2, 2), [torch.ones(2)]], ids=repr)
@pytest.mark.parametrize("op", ["Optimizer.step", "Optimizer.zero_grad"])
def test_optimizer_methods_refuse_non_optimizers(op, obj):
    with pytest.raises(BadArguments):
        lookup(op)(obj)
