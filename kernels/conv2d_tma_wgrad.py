"""Convolution weight and bias gradients (wgrad) on Hopper's tensor memory accelerator: the
GEMM of ``conv2d_backward.conv2d_wgrad_kernel`` with both operands loaded through tensor
descriptors, for a stride-1 layer (any padding, dilation) on channels_last dense x and dy,
C a multiple of 16 and K_out rows of a multiple of 16 bytes (``tma_wgrad_supported``).

dW[k, c, r, s] = sum over pixels (n, p, q) of x[n, p - PH + r*DH, q - PW + s*DW, c] *
dy[n, p, q, k]: GEMM M = (r, s, c), N = K_out, K = the N*P*Q output pixels.

An M tile is one tap (r, s) x BLOCK_M consecutive channels c0 .. c0+BLOCK_M (BLOCK_M divides
C); an N tile BLOCK_N output channels k0 .. k0+BLOCK_N. A K step is BLOCK_K consecutive
output pixels of one output row, (n, p, q0 .. q0+BLOCK_K):

    x box  [1, 1, BLOCK_K, BLOCK_M] at (n, p - PH + r*DH, q0 - PW + s*DW, c0)
    dy box [1, 1, BLOCK_K, BLOCK_N] at (n, p, q0, k0)
    acc[BLOCK_M, BLOCK_N] += x_box^T @ dy_box

TMA's zero fill of the coordinates outside [N, H, W, C] is the padding, and dy's zero fill
past Q (or K_out) makes a ragged last step of a row add nothing (the x it meets there is
zero fill or finite data; a non-finite x there, which the pointer kernel masks, gives NaN):
no masks, no per-pixel index math. The step's (n, p, q0) is carried from step to step (q0
wraps into p, p into n): no division in the loop. A row takes ceil(Q / BLOCK_K) steps, so
BLOCK_K should fit Q.

Split-K runs over the N*P output rows: split i reduces rows [i * ROWS_PER_SPLIT, ...) into an
fp32 partial, merged in split order by ``conv2d_backward.merge_launch``; with one split the
kernel writes dW (and db) directly, as the pointer kernel does. The bias gradient rides on
the pid_m == 0 programs, which also sum each dy tile.

With an input prologue (``conv2d``'s docstring) the x box goes through registers: it is
transformed there, its pixels outside [0, H) x [0, W) set back to 0 (TMA's zero fill would
become relu?(shift)), and the tile's fixed channels load their in_scale/in_shift once. With
a gradient prologue (GRAD_PROLOGUE, ``nhwc.GradientPrologue``) the dy box likewise: y's box
is loaded through a second descriptor at dy's coordinates, dy + scale * y + shift computed in
registers (``gradient_prologue``), its pixels past Q set back to 0 (a ragged last step), the
tile's output channels loading scale/shift once; the box reaches wgmma through a shared
buffer Triton writes each step (wgmma stays asynchronous). Without either:

Both operands reach wgmma from shared memory as TMA wrote them: x^T is M-major (channels
contiguous) and dy is N-major, the transposed layouts wgmma takes for 16-bit operands
(``HGMMA ... tnspA.tnspB``, asynchronous). TF32 wgmma takes K-major operands only: Triton
copies both tiles through registers into K-major shared buffers each step (LDS/STS in the
loop), and the wgmma stays asynchronous (``python -m fastarch compile-report``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv2d import ConvGeometry, gemm_constexprs, inside, prologue_suffix
from .conv2d_tma import (_set_scratch_allocator, fold_suffix, gradient_prologue_operands,
                         tma_supported)
from .launch import UNUSED, Extent, Launch, TileConfig
from .nhwc import (GradientPrologue, InputNormalization, gradient_prologue, input_prologue,
                   is_dense_nhwc, nhwc_descriptor, prologue_operands, strided_extent)
from .runtime import INTERPRETER
from .tensor_cores import Operand, dot


@triton.jit
def _tma_wgrad_reduce(x_desc, dy_desc, grad_y_desc, n, p, c0, k0, tap_h, tap_w, steps, H, W,
                      P, Q, in_scale, in_shift, grad_scale, grad_shift,
                      PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
                      GRAD_PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      UPCAST_OPERANDS: tl.constexpr, WITH_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum of x_box^T @ dy_box (and of dy_box itself, WITH_BIAS) over ``steps`` K steps from
    the start of output row (n, p); ``tap_h``/``tap_w`` are the tap's offsets less padding.
    PROLOGUE: the x box goes through ``input_prologue`` with the [1, BLOCK_M] ``in_scale``
    and ``in_shift`` of its channels, its pixels outside [0, H) x [0, W) set back to 0.
    GRAD_PROLOGUE: the dy box goes through ``gradient_prologue`` with y's box at the same
    coordinates and the [1, BLOCK_N] ``grad_scale``/``grad_shift`` of its channels (0 past
    K_OUT, where dy and y are zero fill), its pixels past Q set back to 0."""
    pixels = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias = tl.zeros((BLOCK_N,), tl.float32)
    q0 = tl.cast(0, tl.int32)
    # At least one step (``conv2d``'s module docstring says why); the host makes none empty.
    for _ in range(tl.maximum(steps, 1)):
        a = x_desc.load([n, p + tap_h, q0 + tap_w, c0]).reshape(BLOCK_K, BLOCK_M)
        if PROLOGUE:
            ok = inside(p + tap_h, H) & inside(q0 + tap_w + pixels, W)
            a = input_prologue(a, ok[:, None], in_scale, in_shift, IN_RELU)
        b = dy_desc.load([n, p, q0, k0]).reshape(BLOCK_K, BLOCK_N)
        if GRAD_PROLOGUE:
            y = grad_y_desc.load([n, p, q0, k0]).reshape(BLOCK_K, BLOCK_N)
            b = gradient_prologue(b, y, (q0 + pixels < Q)[:, None], grad_scale, grad_shift)
        acc = dot(a.T, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
        if WITH_BIAS:
            bias += tl.sum(b.to(tl.float32), axis=0)
        q0 += BLOCK_K
        next_row = q0 >= Q
        q0 = tl.where(next_row, 0, q0)
        p = tl.where(next_row, p + 1, p)
        next_image = p >= P
        p = tl.where(next_image, 0, p)
        n = tl.where(next_image, n + 1, n)
    return acc, bias


@triton.jit
def conv2d_wgrad_tma_kernel(
    x_ptr, dy_ptr, out_ptr, bias_out_ptr, in_scale_ptr, in_shift_ptr, grad_y_ptr,
    grad_scale_ptr, grad_shift_ptr,
    N, H, W, C, P, Q, K_OUT, ROWS, ROWS_PER_SPLIT, Q_TILES,
    o_split, o_sr, o_ss, o_sc, o_sk, b_split, in_scale_s, in_shift_s, grad_scale_s,
    grad_shift_s,
    S: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    GRAD_PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    x_desc = nhwc_descriptor(x_ptr, N, H, W, C, BLOCK_K, BLOCK_M)
    dy_desc = nhwc_descriptor(dy_ptr, N, P, Q, K_OUT, BLOCK_K, BLOCK_N)
    if GRAD_PROLOGUE:  # y's boxes, at dy's coordinates
        grad_y_desc = nhwc_descriptor(grad_y_ptr, N, P, Q, K_OUT, BLOCK_K, BLOCK_N)
    else:
        grad_y_desc = dy_desc  # never read
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    tap = (pid_m * BLOCK_M) // C  # BLOCK_M divides C: the tile lies in one tap
    c0 = pid_m * BLOCK_M - tap * C
    r = tap // S
    s = tap % S
    k0 = tl.program_id(1) * BLOCK_N
    first_row = split * ROWS_PER_SPLIT
    steps = (tl.minimum(first_row + ROWS_PER_SPLIT, ROWS) - first_row) * Q_TILES
    n = first_row // P
    p = first_row - n * P
    # The bias sum rides on the programs of the first M tile only: one compiled loop with
    # the sum, one without, so the other programs pay nothing for it.
    with_bias = (pid_m == 0) if HAS_BIAS else False
    k = k0 + tl.arange(0, BLOCK_N)
    k_ok = k < K_OUT
    c = c0 + tl.arange(0, BLOCK_M)
    if PROLOGUE:  # the tile's channels are fixed: their vectors load once
        in_scale = tl.load(in_scale_ptr + c * in_scale_s)[None, :]
        in_shift = tl.load(in_shift_ptr + c * in_shift_s)[None, :]
    else:
        in_scale = 0.0
        in_shift = 0.0
    if GRAD_PROLOGUE:  # likewise the tile's output channels
        grad_scale = tl.load(grad_scale_ptr + k * grad_scale_s, mask=k_ok, other=0.0)[None, :]
        grad_shift = tl.load(grad_shift_ptr + k * grad_shift_s, mask=k_ok, other=0.0)[None, :]
    else:
        grad_scale = 0.0
        grad_shift = 0.0
    if with_bias:
        acc, bias = _tma_wgrad_reduce(x_desc, dy_desc, grad_y_desc, n, p, c0, k0,
                                      r * DH - PH, s * DW - PW, steps, H, W, P, Q, in_scale,
                                      in_shift, grad_scale, grad_shift, PROLOGUE, IN_RELU,
                                      GRAD_PROLOGUE, DOT_PRECISION, UPCAST_OPERANDS, True,
                                      BLOCK_M, BLOCK_N, BLOCK_K)
        tl.store(bias_out_ptr + split * b_split + k, bias.to(bias_out_ptr.dtype.element_ty),
                 mask=k_ok)
    else:
        acc, bias = _tma_wgrad_reduce(x_desc, dy_desc, grad_y_desc, n, p, c0, k0,
                                      r * DH - PH, s * DW - PW, steps, H, W, P, Q, in_scale,
                                      in_shift, grad_scale, grad_shift, PROLOGUE, IN_RELU,
                                      GRAD_PROLOGUE, DOT_PRECISION, UPCAST_OPERANDS, False,
                                      BLOCK_M, BLOCK_N, BLOCK_K)
    out = split.to(tl.int64) * o_split + r * o_sr + s * o_ss + c * o_sc
    tl.store(out_ptr + out[:, None] + (k * o_sk)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=k_ok[None, :])


# ----------------------------------------------------------------------------- host side

def tma_wgrad_supported(x: torch.Tensor, dy: torch.Tensor, geometry: ConvGeometry,
                        operand: Operand, grad_prologue: GradientPrologue | None = None
                        ) -> bool:
    """Whether the TMA wgrad runs this layer: what the TMA forward needs of x
    (``tma_supported``: Hopper or no GPU, tensor-core operands, dense channels_last, C a
    multiple of 16, stride 1, 16-byte aligned starts, here of x and dy), and of dy: dense
    channels_last, rows of K_out elements a multiple of 16 bytes (TMA's stride alignment),
    and at least one pixel (a descriptor has no empty dimension); and the same of the
    ``grad_prologue``'s y where given (read through a descriptor of its own)."""
    return (tma_supported(x, dy, geometry, operand) and _tma_gradient(dy)
            and (grad_prologue is None or _tma_gradient(grad_prologue.y)))


def _tma_gradient(t: torch.Tensor) -> bool:
    """What the TMA wgrad needs of dy (and of a gradient prologue's y): dense channels_last,
    16-byte aligned start and rows, at least one pixel."""
    return (is_dense_nhwc(t) and t.storage_offset() * t.element_size() % 16 == 0
            and t.shape[1] * t.element_size() % 16 == 0 and t.numel() > 0)


def tma_wgrad_launch(x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor,
                     bias_out: torch.Tensor | None, splits: int, rows_per_split: int,
                     geometry: ConvGeometry, operand: Operand, config: TileConfig, *,
                     prologue: InputNormalization | None = None,
                     grad_prologue: GradientPrologue | None = None) -> Launch:
    """The TMA wgrad of a ``tma_wgrad_supported`` x [N, C, H, W] (read through the input
    ``prologue`` where given) and dy [N, K_out, P, Q] (read through ``grad_prologue``
    where given; dW and db are then those of its dy + scale * y + shift):
    ``out`` [splits, R, S, C, K_out] (any strides) receives split i's dW, ``bias_out``
    [splits, K_out] (K_out contiguous) its db, split i reducing output rows (n, p) i *
    ``rows_per_split`` onwards. ``config.block_m`` must divide C."""
    N, C, H, W = x.shape
    K_out, P, Q = dy.shape[1:]
    R, S = geometry.kernel
    o_split, o_sr, o_ss, o_sc, o_sk = out.stride()
    if x.is_cuda and not INTERPRETER:
        _set_scratch_allocator()
    extra = prologue_operands(prologue, x, C)
    fold = gradient_prologue_operands(grad_prologue, dy)
    return Launch(
        conv2d_wgrad_tma_kernel,
        (R * S * C // config.block_m, triton.cdiv(K_out, config.block_n), splits),
        args={"x_ptr": x, "dy_ptr": dy, "out_ptr": out,
              "bias_out_ptr": bias_out if bias_out is not None else out,
              "N": N, "H": H, "W": W, "C": C, "P": P, "Q": Q, "K_OUT": K_out, "ROWS": N * P,
              "ROWS_PER_SPLIT": rows_per_split, "Q_TILES": triton.cdiv(Q, config.block_k),
              "o_split": o_split, "o_sr": o_sr, "o_ss": o_ss, "o_sc": o_sc, "o_sk": o_sk,
              "b_split": bias_out.stride(0) if bias_out is not None else 0, **extra.args,
              **fold.args},
        extents={"x_ptr": strided_extent("x", (N, C, H, W), dense_nhwc=True),
                 **extra.extents, **fold.extents,
                 "dy_ptr": strided_extent("dy", (N, K_out, P, Q), dense_nhwc=True),
                 "out_ptr": Extent((splits, R, S, C, K_out),
                                   ("o_split", "o_sr", "o_ss", "o_sc", "o_sk")),
                 "bias_out_ptr": UNUSED if bias_out is None
                 else Extent((splits, K_out), ("b_split", 1))},
        constexprs={"S": S, "PH": geometry.padding[0], "PW": geometry.padding[1],
                    "DH": geometry.dilation[0], "DW": geometry.dilation[1],
                    "HAS_BIAS": bias_out is not None, **extra.constexprs,
                    **fold.constexprs,
                    **gemm_constexprs(operand, x.dtype, config)},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_wgrad_tma[{config.name}{prologue_suffix(extra.constexprs, ',')}"
             f"{fold_suffix(fold.constexprs, ',')}]")
