"""PyTorch's own OpInfo sample inputs (``torch.testing._internal.common_methods_invocations
.op_db``) for conv2d, max_pool2d, avg_pool2d, adaptive_avg_pool2d, batch_norm, linear and
relu, run through ``fastarch.functional``'s twin with the same arguments.

Each sample gives the same answer as torch (compared with torch's float64 answer, tolerance
by dtype with atol growing with the length of the sums an output element is made of; integer
results exactly), or raises the exception type torch raises, and it takes torch's fallback
(counted in ``backend.fallback_counts``) exactly when fastarch documents that it does: groups
> 1, a linear weight that is not 2-D or a bias torch broadcasts, an empty BatchNorm input,
and every dtype we do not accelerate (int64 here). Never a different answer.

Samples run in float32 and int64 for every op, bfloat16 for the ops in ``BF16_OPS``;
gradients (float64 reference, a random output gradient) for the float32 samples, in the
same test as their outputs. Every sample runs, except max_pool2d's: OpInfo enumerates 1440
(10 input shapes and layouts x 144 argument combinations) and the interpreter takes ~60 ms
for each forward, ~200 ms with its backward, so we take every ``STEP["max_pool2d"]``-th in
OpInfo's order (19 of them), the step coprime to the sizes of OpInfo's argument grid (2 and
3), so that every value of every argument and every input shape and layout still occur (a
test checks it). The file takes about half a minute of one core. ``error_inputs`` run where
OpInfo has them (conv2d and the pools): the same exception type as torch.
"""
from __future__ import annotations

import functools
import math
import unittest.mock
from typing import Any

import pytest
import torch

import fastarch.functional as FF
from fastarch import backend
from fastarch.testing import assert_close, cudnn_tf32


def _import_op_db() -> list:
    """op_db (its import needs the test extra's expecttest), without the side effect that
    importing torch's test utilities has on the rest of the session: they freeze
    torch.backends' global flags, which other test files set (the cuDNN TF32 switch)."""
    frozen = torch.backends.flags_frozen()
    with unittest.mock.patch.object(torch.backends, "disable_global_flags", lambda: None):
        from torch.testing._internal.common_methods_invocations import op_db
    assert torch.backends.flags_frozen() == frozen
    return op_db


NAMES = ("conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm", "linear",
         "relu")
OPINFOS = {op.name.removeprefix("nn.functional."): op
           for op in _import_op_db()
           if op.name.removeprefix("nn.functional.") in NAMES and op.variant_test_name == ""}
BF16_OPS = ("conv2d", "max_pool2d", "batch_norm", "linear")
STEP = {"max_pool2d": 77}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}

pytestmark = pytest.mark.torch_fallback  # each test asserts its own expected route


@functools.cache
def _samples(name: str, dtype: torch.dtype, requires_grad: bool, device: str) -> list:
    """OpInfo's samples for ``name``, the same in every process: drawn from its generator
    under our own seed (``OpInfo.sample_inputs`` seeds each sample from the calling test's
    name, found by inspecting the stack, which is also slow)."""
    op = OPINFOS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return list(op.sample_inputs_func(op, device, dtype, requires_grad))


@functools.cache
def _error_inputs(name: str, device: str) -> list:
    op = OPINFOS[name]
    return list(op.error_inputs_func(op, device)) if op.error_inputs_func else []


def _selected(name: str, dtype: torch.dtype) -> range:
    """The indices of the samples that run: all, or every ``STEP[name]``-th."""
    return range(0, len(_samples(name, dtype, False, "cpu")), STEP.get(name, 1))


def _params(dtype_id: str, names: tuple[str, ...]) -> list:
    return [pytest.param(name, dtype_id, index, id=f"{name}-{dtype_id}-{index}")
            for name in names for index in _selected(name, DTYPES[dtype_id])]


@pytest.mark.parametrize("name", STEP)
def test_selection_keeps_every_argument_value(name):
    """Every value OpInfo gives each argument, and every input shape and layout, occurs in
    the samples that run."""
    def values(samples: list) -> set:
        return {(key, repr(value)) for sample in samples for key, value in sample.kwargs.items()} \
            | {(tuple(sample.input.shape), sample.input.stride()) for sample in samples}
    samples = _samples(name, torch.float32, False, "cpu")
    assert values([samples[i] for i in _selected(name, torch.float32)]) == values(samples)


def _expects_fallback(name: str, sample: Any, dtype: torch.dtype) -> bool:
    """Whether fastarch documents torch's implementation for this call."""
    if dtype not in backend.ACCELERATED_DTYPES:
        return True
    if name == "conv2d":
        return sample.kwargs.get("groups", 1) != 1
    if name == "linear":
        weight, bias = (*sample.args, None)[:2]
        return weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1])
    if name == "batch_norm":
        return sample.input.numel() == 0
    return False


def _reduction_length(name: str, sample: Any) -> int:
    """How many terms an output element sums (at most): atol grows with its square root."""
    if name == "conv2d":
        return math.prod(sample.args[0].shape[1:])
    if name == "linear":
        return sample.args[0].shape[-1]
    if name == "batch_norm" and sample.kwargs.get("training", False) and sample.input.dim() > 1:
        return sample.input.numel() // max(sample.input.shape[1], 1)  # the statistics' N*H*W
    if name in ("avg_pool2d", "adaptive_avg_pool2d"):
        return math.prod(sample.input.shape[-2:])  # the largest window
    return 1


def _arguments(name: str, sample: Any, convert=lambda t: t) -> tuple[list, dict]:
    """The call's arguments, tensors passed through ``convert``. BatchNorm's running
    statistics, which the call updates, are always fresh copies."""
    def arg(value: Any, position: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if name == "batch_norm" and position in (1, 2):
            return convert(value).detach().clone()
        return convert(value)
    args = [arg(a, position) for position, a in enumerate([sample.input, *sample.args])]
    return args, {key: arg(value, key) for key, value in sample.kwargs.items()}


def _float64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU leaf with t's values (and requires_grad)."""
    if not t.is_floating_point():
        return t.cpu()
    return t.detach().cpu().double().requires_grad_(t.requires_grad)


def _call(fn, args: list, kwargs: dict) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args, **kwargs), None
    except Exception as error:  # any type: the type is what the tests compare
        return None, error


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _assert_same(ours: Any, reference: Any, dtype: torch.dtype, length: int,
                 what: str) -> None:
    """Floating results within tolerance of the float64 reference; integer ones exact."""
    for i, (mine, theirs) in enumerate(zip(_outputs(ours), _outputs(reference), strict=True)):
        name = f"{what}[{i}]"
        if mine.is_floating_point():
            assert_close(mine, theirs, dtype, length, name=name)
        else:
            assert mine.dtype == theirs.dtype and torch.equal(mine.cpu(), theirs.cpu()), name


def _run(name: str, sample: Any, dtype: torch.dtype, args: list, kwargs: dict) -> Any:
    """Ours on the sample, after torch: the same exception type, or our result, taken
    through the documented route. Returns None when both raised."""
    _, torch_error = _call(OPINFOS[name].op, *_arguments(name, sample))
    before = sum(backend.fallback_counts.values())
    ours, error = _call(getattr(FF, name), args, kwargs)
    if torch_error is not None or error is not None:
        assert type(error) is type(torch_error), (
            f"{sample.summary()}: torch raised {torch_error!r}, fastarch {error!r}")
        return None
    fell_back = sum(backend.fallback_counts.values()) != before
    assert fell_back == _expects_fallback(name, sample, dtype), \
        f"{sample.summary()}: took torch's fallback: {fell_back}"
    return ours


def _assert_same_outputs(name: str, sample: Any, dtype: torch.dtype, ours: Any, args: list,
                         reference: Any, ref_args: list) -> None:
    """The outputs, and for BatchNorm the running statistics the call updated."""
    length = _reduction_length(name, sample)
    _assert_same(ours, reference, dtype, length, "output")
    if name == "batch_norm" and args[1] is not None:
        _assert_same((args[1], args[2]), (ref_args[1], ref_args[2]), dtype, length,
                     "running statistics")


# float32 samples run in test_float32_sample_and_its_gradients_match_torch.
@pytest.mark.parametrize("name, dtype_id, index",
                         _params("bfloat16", BF16_OPS) + _params("int64", NAMES))
def test_sample_matches_torch(name, dtype_id, index, device):
    dtype = DTYPES[dtype_id]
    sample = _samples(name, dtype, False, device)[index]
    args, kwargs = _arguments(name, sample)
    with cudnn_tf32(False):  # full-precision fp32, as the reference
        ours = _run(name, sample, dtype, args, kwargs)
        if ours is None:
            return
        if dtype.is_floating_point:
            ref_args, ref_kwargs = _arguments(name, sample, _float64)
        else:
            ref_args, ref_kwargs = _arguments(name, sample)
        reference = OPINFOS[name].op(*ref_args, **ref_kwargs)
    _assert_same_outputs(name, sample, dtype, ours, args, reference, ref_args)


def _grad_leaves(args: list, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values())
            if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("name, dtype_id, index", _params("float32", NAMES))
def test_float32_sample_and_its_gradients_match_torch(name, dtype_id, index, device):
    """The outputs as in test_sample_matches_torch, then the gradients: one call serves
    both."""
    sample = _samples(name, torch.float32, True, device)[index]
    args, kwargs = _arguments(name, sample)
    with cudnn_tf32(False):  # full-precision fp32, as the reference
        ours = _run(name, sample, torch.float32, args, kwargs)
        if ours is None:
            return
        ref_args, ref_kwargs = _arguments(name, sample, _float64)
        reference = OPINFOS[name].op(*ref_args, **ref_kwargs)
        _assert_same_outputs(name, sample, torch.float32, ours, args, reference, ref_args)
        reference, ours = _outputs(reference)[0], _outputs(ours)[0]
        dy = torch.randn_like(ours)
        grads = torch.autograd.grad(ours, _grad_leaves(args, kwargs), dy, allow_unused=True)
        ref_grads = torch.autograd.grad(reference, _grad_leaves(ref_args, ref_kwargs),
                                        dy.cpu().double(), allow_unused=True)
    length = max(_reduction_length(name, sample), ours.numel())  # what any gradient sums
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
        assert (grad is None) == (ref_grad is None), f"gradient {i}"
        if grad is not None:
            assert_close(grad, ref_grad, torch.float32, length, name=f"gradient {i}")


def _error_params() -> list:
    return [pytest.param(name, index, id=f"{name}-{index}") for name in NAMES
            for index in range(len(_error_inputs(name, "cpu")))]


@pytest.mark.parametrize("name, index", _error_params())
def test_error_input_raises_torchs_type(name, index, device):
    error_input = _error_inputs(name, device)[index]
    sample = error_input.sample_input
    with pytest.raises(error_input.error_type) as theirs:
        OPINFOS[name].op(sample.input, *sample.args, **sample.kwargs)
    with pytest.raises(Exception) as ours:
        getattr(FF, name)(sample.input, *sample.args, **sample.kwargs)
    assert ours.type is theirs.type, f"{sample.summary()}: {ours.value!r}"
