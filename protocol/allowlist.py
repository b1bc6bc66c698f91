"""The operations a remote worker will execute, and nothing else.

The wire names an operation by a string such as ``"torch.add"``, ``"Tensor.sum"`` or
``"F.relu"``; the worker looks it up in :data:`COMMANDS`, a table built here, at import time, from
literal names in this file. The wire never reaches ``getattr``, ``import`` or ``eval``: a name not
in the table is a :class:`~protocol.errors.CommandNotAllowed` naming it.

Deliberately absent: anything that reads or writes files or process state (torch's ``load``,
``save``, ``from_file``, ``set_default_*``, ``manual_seed``), re-points or resizes storage
(``set_``, ``as_strided``, ``resize_``, ``share_memory_``), exposes addresses (``data_ptr``,
``storage``), or takes a callable (``apply_``, ``map_``, hooks, optimizer closures).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the name everyone reads

from protocol.errors import BadArguments, CommandNotAllowed

# Functions that exist both as ``torch.<name>`` and as ``Tensor.<name>``.
_MATH = """
abs absolute acos add addbmm addcdiv addcmul addmm addmv all allclose amax amin angle any argmax
argmin argsort asin atan atan2 baddbmm bitwise_and bitwise_not bitwise_or bitwise_xor bmm ceil
chunk clamp clip clone cos cosh count_nonzero cross cummax cummin cumprod cumsum deg2rad det
detach diag diag_embed diagonal diff digamma dist div divide dot eq equal erf erfc erfinv exp
exp2 expm1 fix flatten flip fliplr flipud float_power floor floor_divide fmax fmin fmod frac
gather ge ger greater greater_equal gt heaviside hypot index_add index_copy index_fill
index_select inner inverse isclose isfinite isinf isnan kron kthvalue lerp lgamma log log10
log1p log2 logaddexp logcumsumexp logdet logical_and logical_not logical_or logical_xor logit
logsumexp lt masked_fill masked_select matmul max maximum mean median min minimum mm mode
moveaxis movedim msort mul multiply mv nan_to_num nanmean nanmedian nansum narrow ne neg
negative nonzero norm not_equal numel outer permute pow prod rad2deg ravel reciprocal remainder
renorm repeat_interleave reshape roll rot90 round rsqrt scatter scatter_add select sgn sigmoid
sign signbit sin sinc sinh slogdet softmax sort split sqrt square squeeze std sub subtract sum
svd swapaxes t take tan tanh tensor_split tile topk trace transpose tril triu
true_divide trunc unbind unique unsqueeze var vdot where xlogy
""".split()

_TORCH_ONLY = """
atleast_1d atleast_2d atleast_3d block_diag broadcast_tensors cartesian_prod cat cdist
column_stack concat concatenate conv1d conv2d conv3d conv_transpose1d conv_transpose2d cosine_similarity
dstack einsum empty_like full_like hstack meshgrid ones_like pairwise_distance rand_like
randint_like randn_like relu stack tensordot trapezoid vstack zeros_like
""".split()

_METHOD_ONLY = """
__abs__ __add__ __and__ __eq__ __floordiv__ __ge__ __getitem__ __gt__ __iadd__ __iand__
__imul__ __invert__ __ior__ __isub__ __itruediv__ __ixor__ __le__ __lshift__ __lt__ __matmul__
__mod__ __mul__ __ne__ __neg__ __or__ __pos__ __pow__ __radd__ __rand__ __rfloordiv__
__rlshift__ __rmatmul__ __rmod__ __rmul__ __ror__ __rpow__ __rrshift__ __rshift__ __rsub__
__rtruediv__ __rxor__ __setitem__ __sub__ __truediv__ __xor__
abs_ add_ addcdiv_ addcmul_ addmm_ backward bernoulli_ bfloat16 bool byte char clamp_ clip_
contiguous copy_ cos_ div_ dim double element_size exp_ expand expand_as exponential_ fill_
fill_diagonal_ float floor_ half index_add_ index_fill_ int is_contiguous is_floating_point item
lerp_ log_ long masked_fill_ masked_scatter_ mul_ nelement neg_ new_empty new_full new_ones
new_tensor new_zeros normal_ pow_ random_ reciprocal_ relu relu_ repeat requires_grad_ reshape_as
retain_grad round_ rsqrt_ scatter_ scatter_add_ short sigmoid_ sign_ size sqrt_ square_ squeeze_
sub_ t_ tanh_ to tolist transpose_ tril_ triu_ trunc_ type_as uniform_ unsqueeze_ view view_as
zero_
""".split()

#: Tensor attributes readable through a pointer (``ptr.grad`` is a pointer to the gradient).
TENSOR_ATTRIBUTES = frozenset("grad data T mT H mH real imag is_leaf requires_grad shape dtype ndim".split())

_FUNCTIONAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d avg_pool1d avg_pool2d avg_pool3d
batch_norm binary_cross_entropy binary_cross_entropy_with_logits celu conv1d conv2d conv3d
conv_transpose1d conv_transpose2d cosine_embedding_loss cosine_similarity cross_entropy dropout
dropout1d dropout2d elu embedding fold gaussian_nll_loss gelu glu group_norm gumbel_softmax
hardsigmoid hardswish hardtanh hinge_embedding_loss huber_loss instance_norm kl_div l1_loss
layer_norm leaky_relu linear local_response_norm log_softmax logsigmoid margin_ranking_loss
max_pool1d max_pool2d max_pool3d mish mse_loss multi_margin_loss nll_loss normalize one_hot pad
pairwise_distance pdist pixel_shuffle poisson_nll_loss prelu relu relu6 rms_norm rrelu selu
sigmoid silu smooth_l1_loss soft_margin_loss softmax softmin softplus softshrink softsign
tanh tanhshrink threshold triplet_margin_loss unfold
""".split()

_OPTIMIZERS = "SGD Adam AdamW Adagrad Adadelta Adamax RMSprop NAdam RAdam".split()


def _tensor_attribute(name: str) -> Callable[[Any], Any]:
    getter = operator.attrgetter(name)

    def read(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            raise BadArguments(f"Tensor.{name} needs a tensor, got {type(tensor).__name__}")
        return getter(tensor)

    return read


def _grad(tensor: Any) -> Any:
    """A copy of the gradient: a pointer to the live one would let later writes through it
    change what an optimizer step uses without the worker seeing which data went in."""
    if not isinstance(tensor, torch.Tensor):
        raise BadArguments(f"Tensor.grad needs a tensor, got {type(tensor).__name__}")
    grad = tensor.grad
    return None if grad is None else grad.detach().clone()


def _set_grad(tensor: Any, grad: Any) -> None:
    """Sets a copy, for the reason :func:`_grad` gives."""
    if not isinstance(tensor, torch.Tensor):
        raise BadArguments(f"Tensor.set_grad needs a tensor, got {type(tensor).__name__}")
    tensor.grad = grad.detach().clone() if isinstance(grad, torch.Tensor) else grad


def _optimizer_constructor(cls: type[torch.optim.Optimizer]) -> Callable[..., Any]:
    def construct(params: Any, **hyper: Any) -> torch.optim.Optimizer:
        if not isinstance(params, list | tuple) or not all(isinstance(p, torch.Tensor) for p in params):
            raise BadArguments(f"optim.{cls.__name__} takes a list of parameter tensors")
        return cls(params, **hyper)

    return construct


def _optimizer(obj: Any) -> torch.optim.Optimizer:
    if not isinstance(obj, torch.optim.Optimizer):
        raise BadArguments(f"expected an optimizer, got {type(obj).__name__}")
    return obj


def _optimizer_step(optimizer: Any) -> None:
    _optimizer(optimizer).step()


def _optimizer_zero_grad(optimizer: Any, set_to_none: bool = True) -> None:
    _optimizer(optimizer).zero_grad(set_to_none=bool(set_to_none))


def _tensors(params: Any, op: str) -> list[torch.Tensor]:
    if not isinstance(params, list | tuple) or not all(isinstance(p, torch.Tensor) for p in params):
        raise BadArguments(f"{op} takes a list of parameter tensors")
    return list(params)


def _sgd_step(params: Any, lr: float, weight_decay: float = 0.0, zero_grad: bool = False) -> None:
    """Plain SGD as ``torch.optim.SGD`` computes it (same arithmetic, same result), without an
    optimizer object: nothing to rebuild when a model walks from worker to worker. With
    ``zero_grad`` the gradients are dropped after the step, saving a command per step."""
    with torch.no_grad():
        for param in _tensors(params, "optim.sgd_step"):
            grad = param.grad
            if grad is not None:
                param.add_(grad.add(param, alpha=weight_decay) if weight_decay else grad, alpha=-lr)
                if zero_grad:
                    param.grad = None


def _zero_grad(params: Any) -> None:
    for param in _tensors(params, "optim.zero_grad"):
        param.grad = None


def _build() -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    commands: dict[str, Callable[..., Any]] = {}
    names: dict[Any, str] = {}
    for name in _MATH + _TORCH_ONLY:
        fn = getattr(torch, name)
        commands[f"torch.{name}"] = fn
        names[fn] = f"torch.{name}"
    for name in _MATH + _METHOD_ONLY:
        fn = getattr(torch.Tensor, name)
        commands[f"Tensor.{name}"] = fn
        names.setdefault(fn, f"Tensor.{name}")
    for name in _FUNCTIONAL:
        fn = getattr(F, name)
        commands[f"F.{name}"] = fn
        names[fn] = f"F.{name}"
    for name in TENSOR_ATTRIBUTES:
        commands[f"Tensor.{name}"] = _tensor_attribute(name)
    commands["Tensor.grad"] = _grad
    commands["Tensor.set_grad"] = _set_grad
    for name in _OPTIMIZERS:
        cls = getattr(torch.optim, name)
        commands[f"optim.{name}"] = _optimizer_constructor(cls)
        names[cls] = f"optim.{name}"
    commands["Optimizer.step"] = _optimizer_step
    commands["Optimizer.zero_grad"] = _optimizer_zero_grad
    commands["optim.sgd_step"] = _sgd_step
    commands["optim.zero_grad"] = _zero_grad
    commands["nn.utils.clip_grad_norm_"] = torch.nn.utils.clip_grad_norm_
    commands["getitem"] = operator.getitem
    return commands, names


#: Wire name -> the callable a worker runs for it.
COMMANDS, _NAME_OF = _build()

# What the operations do besides computing a result, for the worker's labels (actors.policy).
#: Write into their first argument (and ``out=``, for any operation).
INPLACE = frozenset(
    op
    for op in COMMANDS
    if op.startswith("Tensor.")
    and (
        (op.endswith("_") and not op.endswith("__"))
        or op.startswith("Tensor.__i")
        or op in ("Tensor.__setitem__", "Tensor.retain_grad")
    )
    and op not in ("Tensor.__invert__", "Tensor.__int__")
)
#: Write into arguments other than the first: the positions (running statistics, a renormalized
#: embedding table). ``F`` functions called with ``inplace=True`` write into their first.
MUTATES = {"F.batch_norm": (1, 2), "F.instance_norm": (1, 2), "F.embedding": (1,)}
#: Return an object sharing storage with an argument without being a view of it.
ALIASING = frozenset({"Tensor.data", "Tensor.detach", "torch.detach"})
#: Results whose shape depends on the values of their inputs (a count of nonzeros, of uniques):
#: even the shape of such a result computed from private data is private.
SHAPE_DEPENDENT = frozenset(
    f"{prefix}.{name}"
    for prefix in ("torch", "Tensor")
    for name in ("nonzero", "unique", "masked_select", "repeat_interleave", "tensor_split")
) | {"F.one_hot"}
#: Read or write the gradients of the parameters they are given.
GRAD_READERS = frozenset({"Tensor.grad", "Optimizer.step", "optim.sgd_step", "nn.utils.clip_grad_norm_"})
#: Drop the gradients of the parameters they are given.
GRAD_CLEARERS = frozenset({"optim.zero_grad", "Optimizer.zero_grad"})


def lookup(op: object) -> Callable[..., Any]:
    """The callable for wire name ``op``, or :class:`CommandNotAllowed` naming it."""
    fn = COMMANDS.get(op) if type(op) is str else None
    if fn is None:
        raise CommandNotAllowed(f"command {op!r} is not on the allowlist")
    return fn


def name_of(fn: Any) -> str:
    """The wire name of a torch function or class, for ``__torch_function__`` dispatch."""
    try:
        return _NAME_OF[fn]
    except (KeyError, TypeError):
        qualname = getattr(fn, "__qualname__", None) or repr(fn)
        raise CommandNotAllowed(f"{qualname} cannot run on a remote worker") from None
