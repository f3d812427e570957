"""Linear's operators and host side: ``fastarch::linear`` (dropout(relu(x @ W^T + b)) in one
GEMM, each step optional) and its backward ``fastarch::linear_backward``; the GEMM tile table
and its choice, the split-K policy, the TF32 decision (``backend.matmul_operand``), output
allocation, and torch's composition of the same layer for what the kernels do not take. The
host functions ``linear_forward`` and ``linear_grads`` also read x through an input prologue
(``kernels.linear``), for ``ops.batch_norm_linear``."""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from fastarch import autotune, backend, profiling
from fastarch.autotune import Generation
from fastarch.kernels.launch import Launch, TileConfig, interpreter_tile
from fastarch.kernels.linear import (InputNormalization, gemm_launch, output_grad_launch,
                                     split_k_epilogue_launch, sum_rows_launch)
from fastarch.kernels.runtime import INTERPRETER, empty, sm_count
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops.common import (absent, fake_empty, no_double_backward, or_absent,
                                 split_reduction, tuned_tile)
from fastarch.ops.dropout import new_seed

# Keyed on columns (n16: N <= 16, LeNet's 10-class head, whatever M), alignment, dropout,
# rows (m64: M <= 64, a small batch; m128 otherwise) and operand type. The one GEMM kernel
# runs all three products: forward (M = batch, N = out features, K = in), input grad
# (M = batch, N = in, K = out) and weight grad (M = out, N = in, K = batch).
# * A row stride that is not a multiple of 16 elements (LeNet's 120 and 84 features, the
#   1000-class head) rules out 16-byte loads and stores; per-element addresses then fill the
#   registers of the larger tiles, so such GEMMs take the "unaligned" tile.
# * Philox keeps four words per element live: a dropout epilogue over the 64 elements a
#   thread of an n128 tile holds needs 255 registers, so dropout takes an n64 tile.
# 16-bit tiles are 64 deep, tf32 ones 32 deep (the same 128 bytes a row per stage); the
# unaligned tiles 32 deep; fp32 without TF32 has no tensor cores and gets one FMA tile.
# Register counts: python -m fastarch compile-report.
def _tensor_core_tiles(operand: Operand, depth: int) -> tuple[TileConfig, ...]:
    kind = operand.value
    return (TileConfig(f"m64_n64_{kind}", 64, 64, depth, num_warps=4, num_stages=4),
            TileConfig(f"m64_n128_{kind}", 64, 128, depth, num_warps=4, num_stages=4),
            TileConfig(f"m128_n16_{kind}", 128, 16, depth, num_warps=4, num_stages=4),
            TileConfig(f"m128_n64_{kind}", 128, 64, depth, num_warps=8, num_stages=4),
            TileConfig(f"m128_n128_{kind}", 128, 128, depth, num_warps=8, num_stages=4),
            TileConfig(f"unaligned_{kind}", 128, 64, 32, num_warps=8, num_stages=3))


GEMM_TILES: dict[str, TileConfig] = {config.name: config for config in (
    *_tensor_core_tiles(Operand.SIXTEEN_BIT, 64),
    *_tensor_core_tiles(Operand.TF32, 32),
    TileConfig("fp32_ieee", 64, 64, 16, num_warps=4, num_stages=2),
)}

# The [rows x columns] tile of the elementwise passes over a 2-D tensor (the backward's
# masked output gradient and bias partials, the split-K epilogue, the bias-gradient merge):
# 4096 elements a program, 16 a thread; BLOCK_N = 256 keeps a row's loads 512 bytes wide.
ROW_TILE = TileConfig("rows16_cols256", block_m=16, block_n=256, num_warps=8)

# Split-K: at batch 64 a 9216 -> 4096 layer has 32 output tiles of 64x128 for 132 SMs and a
# 9216-long reduction, so the reduction is split until the programs fill one wave, each split
# keeping at least MIN_SPLIT_STEPS BLOCK_K steps. The interpreter splits in two once there
# are INTERPRETER_SPLIT_STEPS steps: enough for the tests to reach the split path.
MIN_SPLIT_STEPS = 8
INTERPRETER_SPLIT_STEPS = 4


def gemm_tile(M: int, N: int, K: int, operand: Operand, aligned: bool,
              dropout: bool) -> TileConfig:
    """The tile for C[M, N] = A[M, K] @ B[K, N]; ``aligned``: every operand's row stride is
    a multiple of 16 elements; ``dropout``: the epilogue runs dropout."""
    if INTERPRETER:
        return interpreter_tile(M, N, K)
    if operand is Operand.IEEE:
        return GEMM_TILES["fp32_ieee"]
    if N <= 16:
        return GEMM_TILES[f"m128_n16_{operand.value}"]
    if not aligned:
        return GEMM_TILES[f"unaligned_{operand.value}"]
    height = "m64" if M <= 64 else "m128"
    width = "n64" if dropout else "n128"
    return GEMM_TILES[f"{height}_{width}_{operand.value}"]


def row_tile(M: int, N: int) -> TileConfig:
    """The tile of an elementwise pass over an [M, N] tensor."""
    if INTERPRETER:
        return interpreter_tile(M, N, max_n=256)
    return ROW_TILE


def split_k(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """How many parts the K reduction of a GEMM with ``tiles`` output tiles is split in."""
    steps = triton.cdiv(K, block_k)
    if INTERPRETER:
        return 2 if steps >= INTERPRETER_SPLIT_STEPS else 1
    return max(1, min(sm_count(device) // max(tiles, 1), steps // MIN_SPLIT_STEPS))


def aligned(*tensors: Tensor) -> bool:
    """Whether every stride of these tensors is 1 or a multiple of 16 elements: what the JIT
    needs to know to use 16-byte loads and stores."""
    return all(stride == 1 or stride % 16 == 0 for t in tensors for stride in t.stride())


def gemm_plan(a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor], seed: Optional[Tensor],
              relu: bool, p: float, operand: Operand, product: str,
              prologue: Optional[InputNormalization] = None) -> list[Launch]:
    """The launches computing c = epilogue(a @ b): one GEMM, or a split-K GEMM into an fp32
    partial (allocated here) and its epilogue; x (a in the forward, b in the weight
    gradient) read through ``prologue`` where given."""
    M, K = a.shape
    N = b.shape[1]
    is_aligned, dropout = aligned(a, b, c), p > 0
    static = gemm_tile(M, N, K, operand, is_aligned, dropout)
    epilogue = "".join(flag for flag, on in (("+bias", bias is not None), ("+relu", relu),
                                              ("+dropout", dropout)) if on)
    shape = {"M": triton.next_power_of_2(M), "N": N, "K": K, "product": product,
             "aligned": is_aligned, "operand": operand.value, "epilogue": epilogue,
             **({} if prologue is None
                else {"prologue": "affine+relu" if prologue.relu else "affine"})}
    tile = tuned_tile("linear_gemm", shape, a, static,
                      lambda generation: gemm_candidates(static, M, N, dropout, generation),
                      lambda tile: gemm_launches(a, b, c, bias, seed, relu, p, operand,
                                                  product, tile, prologue), (c,))
    return gemm_launches(a, b, c, bias, seed, relu, p, operand, product, tile, prologue)


def gemm_candidates(static: TileConfig, M: int, N: int, dropout: bool,
                    generation: Generation) -> tuple[TileConfig, ...]:
    """The GEMM tiles tried on a GPU of ``generation``; with a dropout epilogue none wider
    than 64 columns (Philox's live words would spill)."""
    tiles = autotune.gemm_candidates(static, generation, M, N)
    return tuple(tile for tile in tiles if not dropout or tile.block_n <= 64)


def gemm_launches(a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor],
                   seed: Optional[Tensor], relu: bool, p: float, operand: Operand,
                   product: str, tile: TileConfig,
                   prologue: Optional[InputNormalization] = None) -> list[Launch]:
    """``gemm_plan`` on a given tile (its split-K policy and partial allocated)."""
    M, K = a.shape
    N = b.shape[1]
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
    splits, k_per_split = split_reduction(K, split_k(tiles, K, tile.block_k, a.device),
                                          tile.block_k)
    if splits == 1:
        return [gemm_launch(a, b, c, bias, seed, relu, p, operand, tile, 1, k_per_split,
                            product, prologue)]
    partial = empty((splits, M, N), torch.float32, a.device)
    return [gemm_launch(a, b, partial, bias, seed, relu, p, operand, tile, splits,
                        k_per_split, product, prologue),
            split_k_epilogue_launch(partial, c, bias, seed, relu, p, row_tile(M, N), product)]


def output_grad_plan(dy: Tensor, y: Optional[Tensor], seed: Optional[Tensor], relu: bool,
                     p: float, bias_dtype: Optional[torch.dtype]
                     ) -> tuple[list[Launch], Tensor, Optional[Tensor]]:
    """The launches computing g (dy through dropout and ReLU; dy itself when neither ran)
    and, when ``bias_dtype`` is given, the bias gradient db (g's column sums in that dtype):
    (launches, g, db)."""
    M, N = dy.shape
    masked = relu or p > 0
    db = None if bias_dtype is None else empty((N,), bias_dtype, dy.device)
    if M == 0 and db is not None:  # no rows, no partials: the bias gradient is 0
        db.zero_()
    if M == 0 or (not masked and db is None):
        return [], dy, db
    tile = row_tile(M, N)
    g = empty((M, N), dy.dtype, dy.device) if masked else None
    partial = None if db is None else empty((triton.cdiv(M, tile.block_m), N), torch.float32,
                                            dy.device)
    launches = [output_grad_launch(dy, y, seed, g, partial, relu, p, tile)]
    if db is not None:
        launches.append(sum_rows_launch(partial, db, tile))
    return launches, (g if masked else dy), db


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch()


# ----------------------------------------------------------------------------- operators

@torch.library.custom_op("fastarch::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool, p: float,
           seed: Optional[Tensor]) -> Tensor:
    """dropout(relu(x @ weight^T + bias)) of a 2-D x (any strides) in one GEMM, in x's
    dtype; dropout when p > 0, its mask drawn from ``seed``."""
    return linear_forward(x, weight, bias, relu, p, seed)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool, p: float,
                   seed: Optional[Tensor], prologue: Optional[InputNormalization] = None
                   ) -> Tensor:
    """``linear``'s output, x read through ``prologue`` where given."""
    y = empty((x.shape[0], weight.shape[0]), x.dtype, x.device)
    _run(gemm_plan(x, weight.t(), y, bias, seed, relu, p, backend.matmul_operand(x.dtype),
                   "forward", prologue))
    return y


@linear.register_fake
def _(x, weight, bias, relu, p, seed):
    return fake_empty((x.shape[0], weight.shape[0]), x.dtype, x)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, relu, p, seed = inputs
    ctx.relu, ctx.p = relu, p
    ctx.bias_dtype = None if bias is None else bias.dtype
    need_dx, need_dw = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_dw else None, weight if need_dx else None,
                          output if relu else None, seed)


@profiling.op_range("linear.backward")
def _linear_grads(ctx, dy: Tensor):
    x, weight, y, seed = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = linear_backward(dy, x, weight, y, seed, ctx.relu, ctx.p,
                                 ctx.bias_dtype if need_db else None)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None)


linear.register_autograd(_linear_grads, setup_context=_linear_setup)


@torch.library.custom_op("fastarch::linear_backward", mutates_args=())
def linear_backward(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
                    y: Optional[Tensor], seed: Optional[Tensor], relu: bool, p: float,
                    bias_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``linear`` for a 2-D dy: dx when ``weight`` is given, dweight
    when ``x`` is, dbias when ``bias_dtype`` is (placeholders otherwise). ``y`` is the
    forward's output when ``relu``, ``seed`` its dropout seed when ``p`` > 0."""
    dx, dw, db = linear_grads(dy, x, weight, y, seed, relu, p, bias_dtype)
    return or_absent(dx, dy), or_absent(dw, dy), or_absent(db, dy)


def linear_grads(dy: Tensor, x: Optional[Tensor], weight: Optional[Tensor], y: Optional[Tensor],
                 seed: Optional[Tensor], relu: bool, p: float,
                 bias_dtype: Optional[torch.dtype],
                 prologue: Optional[InputNormalization] = None
                 ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``linear_backward``'s (dx, dweight, dbias), None where not asked for; dweight reads x
    through ``prologue`` where given."""
    launches, g, db = output_grad_plan(dy, y, seed, relu, p, bias_dtype)
    _run(launches)
    operand = backend.matmul_operand(dy.dtype)
    dx = dw = None
    if weight is not None:
        dx = empty((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
        _run(gemm_plan(g, weight, dx, None, None, False, 0.0, operand, "input_grad"))
    if x is not None:
        dw = empty((dy.shape[1], x.shape[1]), x.dtype, dy.device)
        _run(gemm_plan(g.t(), x, dw, None, None, False, 0.0, operand, "weight_grad",
                       prologue))
    return dx, dw, db


@linear_backward.register_fake
def _(dy, x, weight, y, seed, relu, p, bias_dtype):
    return (absent(dy) if weight is None else fake_empty((dy.shape[0], weight.shape[1]),
                                                         dy.dtype, dy),
            absent(dy) if x is None else fake_empty((dy.shape[1], x.shape[1]), x.dtype, dy),
            absent(dy) if bias_dtype is None else fake_empty((dy.shape[1],), bias_dtype, dy))


linear_backward.register_autograd(no_double_backward("linear"))


# ----------------------------------------------------------------------------- entry points

def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool, p: float) -> Tensor:
    """dropout(relu(x @ weight^T + bias)) for an x of any leading dimensions and strides
    (checked arguments); dropout when p > 0, with a new seed."""
    seed = new_seed(x.device) if p > 0 else None
    x2d = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    y = linear(x2d, weight, bias, relu, p, seed)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def torch_apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool,
                p: float) -> Tensor:
    """The same layer on torch's ops (the fallback), with torch's errors."""
    y = F.linear(x, weight, bias)
    if relu:
        y = F.relu(y)
    return F.dropout(y, p, training=True) if p > 0 else y
