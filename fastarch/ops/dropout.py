"""Dropout's operators and host side: ``fastarch::dropout`` (differentiable: its backward is
the same kernel on dy with the forward's seed), ``fastarch::dropout_`` (in place; a mutable
operator carries no autograd formula), the seed every dropout draws (the linear epilogue's
too), output allocation and the elementwise tile."""
import torch
import triton
from torch import Tensor

from fastarch import profiling
from fastarch.kernels.dropout import dropout_launch
from fastarch.kernels.launch import TileConfig, interpreter_tile
from fastarch.kernels.runtime import INTERPRETER, empty, memory_format_of
from fastarch.ops.common import elementwise, fake_empty, run_memory_bound

# Philox costs ~100 integer ops an element, so dropout is compute-bound: 8 elements a thread.
DROPOUT_TILE = TileConfig("block2048", block_m=2048, num_warps=8)


def dropout_tile(numel: int) -> TileConfig:
    """The tile of a dropout pass over ``numel`` elements."""
    if INTERPRETER:
        return interpreter_tile(numel)
    return DROPOUT_TILE


def new_seed(device: torch.device) -> Tensor:
    """A dropout seed from torch's default generator on ``device``, as a 1-element tensor:
    ``torch.manual_seed`` reproduces it, and each call gets a new mask."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _run(x: Tensor, y: Tensor, seed: Tensor, p: float) -> None:
    """y = dropout(x) on the tuned tile (the mask depends on the element, not the tile)."""
    run_memory_bound("dropout", x, dropout_tile(x.numel()),
                     {"numel": triton.next_power_of_2(x.numel())},
                     lambda tile: dropout_launch(x, y, seed, p, tile), (y,))


@torch.library.custom_op("fastarch::dropout", mutates_args=())
def dropout(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """x * mask / (1 - p) of a dense x, the mask keyed on memory order and drawn from
    ``seed``; the same call on dy is the backward."""
    y = empty(x.shape, x.dtype, x.device, memory_format_of(x))
    _run(x, y, seed, p)
    return y


@dropout.register_fake
def _(x, p, seed):
    return fake_empty(x.shape, x.dtype, x, memory_format_of(x))


def _dropout_setup(ctx, inputs, output) -> None:
    x, p, seed = inputs
    ctx.p, ctx.memory_format = p, memory_format_of(x)
    ctx.save_for_backward(seed)


@profiling.op_range("dropout.backward")
def _dropout_grads(ctx, dy: Tensor):
    (seed,) = ctx.saved_tensors
    dy = dy.contiguous(memory_format=ctx.memory_format)  # the mask follows memory order
    return dropout(dy, ctx.p, seed), None, None


dropout.register_autograd(_dropout_grads, setup_context=_dropout_setup)


@torch.library.custom_op("fastarch::dropout_", mutates_args=("x",))
def dropout_(x: Tensor, p: float, seed: Tensor) -> None:
    """``dropout`` of a dense x in place."""
    _run(x, x, seed, p)


@dropout_.register_fake
def _(x, p, seed):
    return None


def apply(x: Tensor, p: float, inplace: bool) -> Tensor:
    """Dropout of a floating-point x with a new seed, or of x itself when ``inplace`` (see
    ``common.elementwise``)."""
    seed = new_seed(x.device)
    return elementwise(x, inplace, lambda t: dropout(t, p, seed),
                       lambda t: dropout_(t, p, seed))
