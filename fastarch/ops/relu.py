"""ReLU's operators and host side: ``fastarch::relu`` (differentiable: its backward,
``fastarch::relu_backward``, reads the saved output), ``fastarch::relu_`` (in place; a
mutable operator carries no autograd formula), output allocation and the elementwise tile."""
from collections.abc import Callable

import torch
import triton
from torch import Tensor

from fastarch import profiling
from fastarch.kernels.launch import Launch, TileConfig, interpreter_tile
from fastarch.kernels.relu import backward_launch, forward_launch
from fastarch.kernels.runtime import INTERPRETER, empty, memory_format_of
from fastarch.ops.common import elementwise, fake_empty, no_double_backward, run_memory_bound

# 4096 elements a program, 16 a thread: a memory-bound pass at full bandwidth.
RELU_TILE = TileConfig("block4096", block_m=4096, num_warps=8)


def relu_tile(numel: int) -> TileConfig:
    """The tile of a ReLU pass over ``numel`` elements."""
    if INTERPRETER:
        return interpreter_tile(numel)
    return RELU_TILE


def _run(family: str, x: Tensor, build: Callable[[TileConfig], Launch],
         written: tuple[Tensor, ...]) -> None:
    """Run a ReLU pass over x's elements on its tuned tile."""
    run_memory_bound(family, x, relu_tile(x.numel()),
                     {"numel": triton.next_power_of_2(x.numel())}, build, written)


@torch.library.custom_op("fastarch::relu", mutates_args=())
def relu(x: Tensor) -> Tensor:
    """ReLU of a dense x (contiguous or channels_last), in x's layout."""
    y = empty(x.shape, x.dtype, x.device, memory_format_of(x))
    _run("relu_forward", x, lambda tile: forward_launch(x, y, tile), (y,))
    return y


@relu.register_fake
def _(x):
    return fake_empty(x.shape, x.dtype, x, memory_format_of(x))


def _relu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


@profiling.op_range("relu.backward")
def _relu_grads(ctx, dy: Tensor) -> Tensor:
    (y,) = ctx.saved_tensors
    return relu_backward(y, dy)


relu.register_autograd(_relu_grads, setup_context=_relu_setup)


@torch.library.custom_op("fastarch::relu_", mutates_args=("x",))
def relu_(x: Tensor) -> None:
    """ReLU of a dense x in place."""
    _run("relu_forward", x, lambda tile: forward_launch(x, x, tile), (x,))


@relu_.register_fake
def _(x):
    return None


@torch.library.custom_op("fastarch::relu_backward", mutates_args=())
def relu_backward(y: Tensor, dy: Tensor) -> Tensor:
    """dy where the ReLU output y (dense) is > 0 (or NaN), else 0; dy in any layout (copied
    to y's if needed)."""
    memory_format = memory_format_of(y)
    if not dy.is_contiguous(memory_format=memory_format):
        dy = dy.contiguous(memory_format=memory_format)
    dx = empty(y.shape, dy.dtype, y.device, memory_format)
    _run("relu_backward", y, lambda tile: backward_launch(y, dy, dx, tile), (dx,))
    return dx


@relu_backward.register_fake
def _(y, dy):
    return fake_empty(y.shape, dy.dtype, y, memory_format_of(y))


relu_backward.register_autograd(no_double_backward("relu"))


def apply(x: Tensor, inplace: bool) -> Tensor:
    """relu(x), or x itself rectified when ``inplace`` (see ``common.elementwise``)."""
    return elementwise(x, inplace, relu, relu_)
