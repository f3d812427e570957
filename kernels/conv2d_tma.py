"""Convolution forward on Hopper's tensor memory accelerator: the implicit GEMM of
``conv2d.conv2d_forward_kernel`` with both operands loaded through tensor descriptors, for
a stride-1 layer (any padding, dilation) on a channels_last input whose C is a multiple of
16 (``tma_supported``).

An M tile is BLOCK_M consecutive output pixels of one output row (n, p, q0 .. q0+BLOCK_M):
its input slice for tap (r, s) and channels c0 .. c0+BLOCK_K is one [1, 1, BLOCK_M,
BLOCK_K] box of the NHWC input at (n, p + r*DH - PH, q0 + s*DW - PW, c0), and TMA's zero
fill of the coordinates outside [N, H, W, C] is the padding: no masks, no index math per
pixel. (A taller box, several rows at once, has to be reshaped through registers and
feeds wgmma a register operand.) The weight is the [K_out, R*S*C] matrix the pointer kernel
reads, in [BLOCK_N, BLOCK_K] boxes; BLOCK_K divides C, so a K step never crosses a tap.
A row's last tile reaches past Q: those pixels read zeros or real neighbours and are
neither stored nor counted.

With an input prologue (PROLOGUE, ``conv2d``'s docstring) the x box is loaded to
registers, transformed there, its pixels outside [0, H) x [0, W) (where TMA's zero fill
would otherwise become relu?(shift)) set back to 0, and fed to wgmma as its register A
operand; the weight stays in shared memory (wgmma asynchronous, no C7515).

The M tiles are N * P * ceil(Q / BLOCK_M) (``tma_m_tiles``), not ceil(N*P*Q / BLOCK_M):
the STATS partials have one row per M tile. The epilogue is the pointer kernel's
(``conv2d.forward_epilogue``).

The grid is persistent: PROGRAMS_PER_SM programs an SM (fewer where there are fewer
tiles), each looping over its tiles in a grouped raster (GROUP_M M tiles by every N tile,
M fastest), so that the programs running at once share their input rows and weight tiles
in L2.

The input gradient runs on the same kernel (``tma_dgrad_launches``): each stride phase of
dx is a stride-1 convolution of dy (``tma_dgrad_phase``), and a phase no tap reaches is
stored as zeros (``zero_fill_kernel``). It may fold the BatchNorms around the conv in
(``nhwc.GradientPrologue``, ``nhwc.BatchNormGradEpilogue``): with GRAD_PROLOGUE, y's box is
loaded through a second descriptor at dy's coordinates and dy's box goes through
``gradient_prologue`` in registers as x's through the input prologue (its pixels outside dy
set back to 0; a register operand, wgmma asynchronous); with BN_GRAD, ``forward_epilogue``
stores du * scale and each M tile of each phase writes its own row of the sums, a zero-filled
phase one row of zeros (``tma_dgrad_sum_rows``).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # Triton's allocator has no public getter

from .conv2d import (ConvGeometry, epilogue_operands, forward_epilogue, gemm_constexprs,
                     inside, next_channel_step, prologue_suffix)
from .conv2d_backward import phase_steps
from .launch import UNUSED, Launch, TileConfig, dense, vector
from .nhwc import (BatchNormGradEpilogue, GradientPrologue, InputNormalization,
                   gradient_prologue, input_prologue, nhwc_descriptor, prologue_operands,
                   strided_args, strided_extent)
from .runtime import INTERPRETER, sm_count
from .tensor_cores import Operand, dot

# TMA needs 16-byte aligned strides (C a multiple of 8 in 16-bit) and a K step at least 16
# deep that stays inside one tap: C a multiple of 16.
TMA_CHANNEL_MULTIPLE = 16

# The persistent grid's raster: every N tile of GROUP_M consecutive M tiles (neighbouring
# output rows, which read overlapping input rows) before the next group.
GROUP_M = 8
# Programs of the persistent grid per SM: two, so that a tile small enough for two CTAs an
# SM overlaps one program's epilogue with the other's main loop. Where only one fits, the
# second wave takes the other half of the tiles (program i takes tiles i, i + 2 * SMs, ...):
# the same tiles per SM, each wave's tiles contiguous in the raster.
PROGRAMS_PER_SM = 2


@triton.jit
def conv2d_forward_tma_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr, stats_ptr,
    in_scale_ptr, in_shift_ptr, grad_y_ptr, grad_scale_ptr, grad_shift_ptr,
    bn_x_ptr, bn_mean_ptr, bn_scale_ptr, bn_shift_ptr, sums_ptr,
    N, C, C_TILES, H, W, P, Q, Q_PADDED, K_OUT, K_TOTAL, NUM_M_TILES, NUM_PROGRAMS,
    bias_s, scale_s, shift_s, res_sn, res_sh, res_sw, res_sc, y_sn, y_sh, y_sw, y_sc,
    in_scale_s, in_shift_s, grad_scale_s, grad_shift_s,
    bn_x_sn, bn_x_sh, bn_x_sw, bn_x_sc, bn_mean_s, bn_scale_s, bn_shift_s, sums_row0,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, GRAD_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, BN_GRAD: tl.constexpr,
    BN_RELU: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    x_desc = nhwc_descriptor(x_ptr, N, H, W, C, BLOCK_M, BLOCK_K)
    if GRAD_PROLOGUE:  # y's boxes, at x's coordinates
        grad_y_desc = nhwc_descriptor(grad_y_ptr, N, H, W, C, BLOCK_M, BLOCK_K)
    else:
        grad_y_desc = x_desc  # never read
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K_OUT, K_TOTAL], strides=[K_TOTAL, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    n_tiles = tl.cdiv(K_OUT, BLOCK_N)
    # Q_PADDED, not Q_TILES, which is often 1 and then a constant: q0 would fold to 0 and
    # the epilogue's masks and offsets be hoisted out of the tile loop, live (spilled)
    # across the K loop.
    q_tiles = Q_PADDED // BLOCK_M
    # The grouped raster walks whole groups (GROUP_M M tiles by every N tile, M fastest): the
    # last group's tiles past NUM_M_TILES are skipped, which keeps GROUP_M the only divisor
    # of the group arithmetic (a ragged group's divisor costs the K loop instructions).
    for tile in range(tl.program_id(0), tl.cdiv(NUM_M_TILES, GROUP_M) * GROUP_M * n_tiles,
                      NUM_PROGRAMS):
        group_column = tile // GROUP_M  # group * n_tiles + tile_n
        tile_m = group_column // n_tiles * GROUP_M + tile % GROUP_M
        tile_n = group_column % n_tiles
        if tile_m < NUM_M_TILES:
            image_row = tile_m // q_tiles  # n * P + p
            q0 = (tile_m % q_tiles) * BLOCK_M
            n = image_row // P
            p = image_row % P
            k_out0 = tile_n * BLOCK_N
            acc = _tile_product(x_desc, w_desc, grad_y_desc, in_scale_ptr, in_shift_ptr,
                                grad_scale_ptr, grad_shift_ptr, n, p - PH, q0 - PW, k_out0, C,
                                C_TILES, H, W, in_scale_s, in_shift_s, grad_scale_s,
                                grad_shift_s, R, S, DH, DW, PROLOGUE, IN_RELU, GRAD_PROLOGUE,
                                DOT_PRECISION, UPCAST_OPERANDS, BLOCK_M, BLOCK_N, BLOCK_K)
            q = q0 + tl.arange(0, BLOCK_M)
            forward_epilogue(acc, bias_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr,
                             stats_ptr, n.to(tl.int64), p.to(tl.int64), q.to(tl.int64), q < Q,
                             Q - q0, k_out0 + tl.arange(0, BLOCK_N), K_OUT, tile_m,
                             NUM_M_TILES, bias_s, scale_s, shift_s, res_sn, res_sh, res_sw,
                             res_sc, y_sn, y_sh, y_sw, y_sc, HAS_BIAS, STATS, HAS_SCALE_SHIFT,
                             HAS_RESIDUAL, RELU, BLOCK_M, bn_x_ptr=bn_x_ptr,
                             bn_mean_ptr=bn_mean_ptr, bn_scale_ptr=bn_scale_ptr,
                             bn_shift_ptr=bn_shift_ptr, sums_ptr=sums_ptr, bn_x_sn=bn_x_sn,
                             bn_x_sh=bn_x_sh, bn_x_sw=bn_x_sw, bn_x_sc=bn_x_sc,
                             bn_mean_s=bn_mean_s, bn_scale_s=bn_scale_s, bn_shift_s=bn_shift_s,
                             sums_row=sums_row0 + tile_m, BN_GRAD=BN_GRAD, BN_RELU=BN_RELU)


@triton.jit
def _tile_product(x_desc, w_desc, grad_y_desc, in_scale_ptr, in_shift_ptr, grad_scale_ptr,
                  grad_shift_ptr, n, h0, w0, k_out0, C, C_TILES, H, W, in_scale_s, in_shift_s,
                  grad_scale_s, grad_shift_s,
                  R: tl.constexpr, S: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, GRAD_PROLOGUE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] product of one tile: pixels (n, h0 + PH, w0 + PW ..) by
    output channels k_out0 .., over every (tap, channel step). PROLOGUE: the x box goes
    through ``input_prologue`` in registers, its pixels outside [0, H) x [0, W) (TMA's zero
    fill, the padding) set back to 0, and reaches wgmma as a register operand.
    GRAD_PROLOGUE (the input gradient's, x being dy): likewise through
    ``gradient_prologue`` with y's box, loaded at the same coordinates."""
    lanes = tl.arange(0, BLOCK_K)
    pixels = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    tap_h = 0
    tap_w = 0
    c0 = 0
    tap_column = 0  # the tap's first weight column, tap * C
    # At least one step, though C_TILES >= 1 (``conv2d``'s module docstring says why).
    for _ in range(tl.maximum(R * S * C_TILES, 1)):
        a = x_desc.load([n, h0 + tap_h, w0 + tap_w, c0]).reshape(BLOCK_M, BLOCK_K)
        if PROLOGUE:
            scale = tl.load(in_scale_ptr + (c0 + lanes) * in_scale_s)
            shift = tl.load(in_shift_ptr + (c0 + lanes) * in_shift_s)
            ok = inside(h0 + tap_h, H) & inside(w0 + tap_w + pixels, W)
            a = input_prologue(a, ok[:, None], scale[None, :], shift[None, :], IN_RELU)
        if GRAD_PROLOGUE:
            y = grad_y_desc.load([n, h0 + tap_h, w0 + tap_w, c0]).reshape(BLOCK_M, BLOCK_K)
            scale = tl.load(grad_scale_ptr + (c0 + lanes) * grad_scale_s)
            shift = tl.load(grad_shift_ptr + (c0 + lanes) * grad_shift_s)
            ok = inside(h0 + tap_h, H) & inside(w0 + tap_w + pixels, W)
            a = gradient_prologue(a, y, ok[:, None], scale[None, :], shift[None, :])
        b = w_desc.load([k_out0, tap_column + c0])
        acc = dot(a, b.T, acc, DOT_PRECISION, UPCAST_OPERANDS)
        c0, tap_column, tap_w, tap_h = next_channel_step(c0, tap_column, tap_w, tap_h, C, S,
                                                         DW, DH, BLOCK_K)
    return acc


# ----------------------------------------------------------------------------- host side

def tma_supported(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                  operand: Operand) -> bool:
    """Whether the TMA kernel runs this layer: tensor-core operands (16-bit or TF32), a dense
    channels_last input with C a multiple of ``TMA_CHANNEL_MULTIPLE``, stride 1, x and
    weight starting 16-byte aligned in their storage (TMA's global addresses must be; the
    weight matrix is a view of a channels_last weight), on a Hopper or later GPU (or no GPU:
    the interpreter, the compile report's meta tensors)."""
    return (tma_activation(x, operand) and _aligned(weight)
            and geometry.stride == (1, 1))


def tma_activation(t: torch.Tensor, operand: Operand) -> bool:
    """What a TMA kernel needs of the activation it reads through a 4-D NHWC descriptor (x in
    the forward, dy in the input gradient): tensor-core operands, a dense channels_last 4-D
    tensor with C a multiple of ``TMA_CHANNEL_MULTIPLE`` starting 16-byte aligned, on a
    Hopper or later GPU (or no GPU)."""
    on_hopper = t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] >= 9
    return (on_hopper and operand is not Operand.IEEE and t.dim() == 4 and _aligned(t)
            and t.shape[1] % TMA_CHANNEL_MULTIPLE == 0
            and t.is_contiguous(memory_format=torch.channels_last))


def tma_gradient_supported(dy: torch.Tensor, operand: Operand,
                           grad_prologue: GradientPrologue | None = None) -> bool:
    """Whether a TMA input gradient reads this dy (``tma_activation``) and, where given, the
    ``grad_prologue``'s y, whose boxes are loaded through a descriptor of their own at dy's
    coordinates: y must be a TMA activation too."""
    return tma_activation(dy, operand) and (grad_prologue is None
                                            or tma_activation(grad_prologue.y, operand))


def _aligned(t: torch.Tensor) -> bool:
    """Whether t starts 16-byte aligned in its storage (TMA's global addresses must)."""
    return t.storage_offset() * t.element_size() % 16 == 0


def tma_m_tiles(batch: int, out_height: int, out_width: int, block_m: int) -> int:
    """The M tiles of the TMA kernel: ceil(Q / block_m) per output row."""
    return batch * out_height * triton.cdiv(out_width, block_m)


def tma_block_k(channels: int, deepest: int) -> int:
    """The deepest power of two, at most ``deepest``, dividing ``channels`` (a multiple of
    16): a K step inside one tap."""
    return min(deepest, channels & -channels)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_scratch_allocator() -> None:
    """Device-side tensor descriptors are built in a global scratch buffer, which Triton
    allocates through ``triton.set_allocator``: set it before the launch where none is set
    (a context variable, so once per thread; an allocator of the caller's own stays)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


class FoldOperands(NamedTuple):
    """What a backward fold (a ``GradientPrologue`` or a ``BatchNormGradEpilogue``) adds to
    a TMA launch: its arguments (placeholders, never read, where absent), their extents, and
    its constexprs."""
    args: dict
    extents: dict
    constexprs: dict


def gradient_prologue_operands(prologue: GradientPrologue | None,
                               dy: torch.Tensor) -> FoldOperands:
    """The launch operands of ``prologue`` on the dy [N, K, P, Q] a TMA kernel reads through
    a descriptor: ``grad_y_ptr`` (y, read through a descriptor of dy's shape: dense
    channels_last), the fp32 [K] ``grad_scale_ptr``/``grad_shift_ptr`` and their strides,
    and GRAD_PROLOGUE."""
    names = ("grad_y_ptr", "grad_scale_ptr", "grad_shift_ptr")
    if prologue is None:
        return FoldOperands({**dict.fromkeys(names, dy), "grad_scale_s": 0, "grad_shift_s": 0},
                            dict.fromkeys(names, UNUSED), {"GRAD_PROLOGUE": False})
    K = dy.shape[1]
    return FoldOperands(
        {"grad_y_ptr": prologue.y, "grad_scale_ptr": prologue.scale,
         "grad_shift_ptr": prologue.shift, "grad_scale_s": prologue.scale.stride(0),
         "grad_shift_s": prologue.shift.stride(0)},
        {"grad_y_ptr": strided_extent("grad_y", tuple(dy.shape), dense_nhwc=True),
         "grad_scale_ptr": vector(prologue.scale, K, "grad_scale_s", (torch.float32,)),
         "grad_shift_ptr": vector(prologue.shift, K, "grad_shift_s", (torch.float32,))},
        {"GRAD_PROLOGUE": True})


def batch_norm_grad_operands(epilogue: BatchNormGradEpilogue | None, dx: torch.Tensor,
                             sums_row: int) -> FoldOperands:
    """The launch operands of ``epilogue`` (its x of dx's shape, any strides) on a TMA launch
    writing dx [N, C, H, W] whose M tiles write the rows of ``epilogue.sums`` from
    ``sums_row`` on (``forward_epilogue``'s BN_GRAD and BN_RELU)."""
    names = ("bn_x_ptr", "bn_mean_ptr", "bn_scale_ptr", "bn_shift_ptr", "sums_ptr")
    vectors = ("bn_mean_s", "bn_scale_s", "bn_shift_s")
    if epilogue is None:
        return FoldOperands({**dict.fromkeys(names, dx), **strided_args("bn_x", dx),
                             **dict.fromkeys(vectors, 0), "sums_row0": 0},
                            dict.fromkeys(names, UNUSED), {"BN_GRAD": False, "BN_RELU": False})
    C = dx.shape[1]
    normalization = epilogue.normalization
    channel_vectors = {"bn_mean": epilogue.mean, "bn_scale": normalization.scale,
                       "bn_shift": normalization.shift}
    return FoldOperands(
        {"bn_x_ptr": epilogue.x, **{f"{name}_ptr": t for name, t in channel_vectors.items()},
         "sums_ptr": epilogue.sums, **strided_args("bn_x", epilogue.x),
         **{f"{name}_s": t.stride(0) for name, t in channel_vectors.items()},
         "sums_row0": sums_row},
        {"bn_x_ptr": strided_extent("bn_x", tuple(dx.shape)),
         **{f"{name}_ptr": vector(t, C, f"{name}_s", (torch.float32,))
            for name, t in channel_vectors.items()},
         "sums_ptr": dense(epilogue.sums.shape[0], 2, C, dtypes=(torch.float32,))},
        {"BN_GRAD": True, "BN_RELU": normalization.relu})


def fold_suffix(constexprs: dict, separator: str = "+") -> str:
    """A launch name's mark of the backward folds it applies (its GRAD_PROLOGUE, BN_GRAD and
    BN_RELU constexprs, where it has them): "grad_prologue", then "bn_grad" or
    "bn_grad_relu", each after ``separator``; or nothing."""
    marks = [mark for mark, on in (
        ("grad_prologue", constexprs.get("GRAD_PROLOGUE", False)),
        ("bn_grad_relu" if constexprs.get("BN_RELU") else "bn_grad",
         constexprs.get("BN_GRAD", False))) if on]
    return "".join(separator + mark for mark in marks)


def tma_forward_launch(x: torch.Tensor, weight_rsc: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
                       y: torch.Tensor, stats: torch.Tensor | None, geometry: ConvGeometry,
                       operand: Operand, config: TileConfig, *,
                       prologue: InputNormalization | None = None,
                       residual: torch.Tensor | None = None,
                       grad_prologue: GradientPrologue | None = None,
                       grad_epilogue: BatchNormGradEpilogue | None = None,
                       sums_row: int = 0) -> Launch:
    """The TMA launch for a ``tma_supported`` x [N, C, H, W] (channels_last), ``weight_rsc``
    [K_out, R, S, C] contiguous, [K_out] bias, scale and shift (any stride), y [N, K_out, P,
    Q] (any strides), for the STATS epilogue a dense [3, ``tma_m_tiles``, K_out] fp32
    ``stats``, the input ``prologue`` and the epilogue's ``residual`` (y's shape and dtype,
    any strides) where given. ``config.block_k`` must divide C. An input gradient's phase
    (``tma_dgrad_launches``; x is dy, y a phase of dx) may read x through ``grad_prologue``
    (its y a ``tma_activation`` of x's shape) and end in ``grad_epilogue`` (its x of y's
    shape, the phase's), whose M tiles write the sums rows ``sums_row`` onwards."""
    N, C, H, W = x.shape
    K_out, R, S, _ = weight_rsc.shape
    P, Q = y.shape[2:]
    q_tiles = triton.cdiv(Q, config.block_m)
    m_tiles = N * P * q_tiles
    if x.is_cuda and not INTERPRETER:
        _set_scratch_allocator()
    epilogue = epilogue_operands(y, bias, scale, shift, relu, stats, m_tiles, residual)
    extra = prologue_operands(prologue, x, C)
    folds = [gradient_prologue_operands(grad_prologue, x),
             batch_norm_grad_operands(grad_epilogue, y, sums_row)]
    fold_constexprs = {name: on for fold in folds for name, on in fold.constexprs.items()}
    programs = min(PROGRAMS_PER_SM * sm_count(x.device),
                   m_tiles * triton.cdiv(K_out, config.block_n))
    return Launch(
        conv2d_forward_tma_kernel, (programs,),
        args={"x_ptr": x, "w_ptr": weight_rsc, "y_ptr": y, **epilogue.args,
              "N": N, "C": C, "C_TILES": C // config.block_k, "H": H, "W": W, "P": P,
              "Q": Q, "Q_PADDED": q_tiles * config.block_m, "K_OUT": K_out,
              "K_TOTAL": R * S * C, "NUM_M_TILES": m_tiles, "NUM_PROGRAMS": programs,
              **strided_args("y", y), **extra.args, **folds[0].args, **folds[1].args},
        extents={"x_ptr": strided_extent("x", (N, C, H, W), dense_nhwc=True),
                 "w_ptr": dense(K_out, R * S * C),
                 "y_ptr": strided_extent("y", (N, K_out, P, Q)), **epilogue.extents,
                 **extra.extents, **folds[0].extents, **folds[1].extents},
        constexprs={"R": R, "S": S, **geometry.constexprs(), **epilogue.constexprs,
                    **extra.constexprs, **fold_constexprs,
                    **gemm_constexprs(operand, x.dtype, config), "GROUP_M": GROUP_M},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_forward_tma[{config.name},{epilogue.name_suffix(x.dtype)}"
             f"{prologue_suffix(extra.constexprs)}{fold_suffix(fold_constexprs)}]")


# ----------------------------------------------------------------------------- input gradient

@triton.jit
def zero_fill_kernel(y_ptr, sums_ptr, P, Q, C, sums_row, y_sn, y_sh, y_sw, y_sc,
                     SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zeros into y [N, C, P, Q] (any strides): BLOCK_M pixels of one row x BLOCK_N channels
    a program, grid (N * P, ceil(Q / BLOCK_M), ceil(C / BLOCK_N)). SUMS: the programs of the
    first pixels also zero their channels of row ``sums_row`` of the dense [rows, 2, C]
    ``sums_ptr`` (a ``BatchNormGradEpilogue``'s, whose du is 0 here)."""
    image_row = tl.program_id(0)
    row = (image_row // P).to(tl.int64) * y_sn + (image_row % P).to(tl.int64) * y_sh
    q = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = row + (q.to(tl.int64) * y_sw)[:, None] + (c.to(tl.int64) * y_sc)[None, :]
    tl.store(y_ptr + offsets, tl.zeros((BLOCK_M, BLOCK_N), y_ptr.dtype.element_ty),
             mask=(q < Q)[:, None] & (c < C)[None, :])
    if SUMS:
        first = (image_row == 0) & (tl.program_id(1) == 0)
        sums = sums_ptr + tl.cast(sums_row, tl.int64) * 2 * C + c
        zeros = tl.zeros((BLOCK_N,), tl.float32)
        tl.store(sums, zeros, mask=first & (c < C))
        tl.store(sums + C, zeros, mask=first & (c < C))


class PhaseTaps(NamedTuple):
    """The taps of one kernel axis reaching the dx rows of one stride phase, as a stride-1
    convolution over the phase's rows (``tma_dgrad_phase``): taps first, first + step, ...
    (``count`` of them), at ``dilation`` rows of dy apart, with top ``padding``."""
    first: int
    count: int
    step: int
    dilation: int
    padding: int


def dgrad_phase_taps(phase: int, padding: int, taps: int, stride: int, dilation: int) -> PhaseTaps:
    """The taps reaching dx rows h = phase (mod stride) along one axis of a convolution with
    top ``padding``, ``taps`` taps, ``stride`` and ``dilation`` (the host side of
    ``conv2d_backward.phase_taps``).

    Tap r reaches h from dy row p = (h + padding - r * dilation) / stride where that divides:
    r = first, first + step, ... (step = stride / g, g = gcd(stride, dilation); none unless
    g divides phase + padding). For the phase's i-th row (h = phase + i * stride) and its
    j-th tap, p = i + base - j * dstep, base = (phase + padding - first * dilation) / stride,
    dstep = dilation / g. Taking the taps in reverse, j = count - 1 - j', gives p = i -
    pad + j' * dstep with pad = (count - 1) * dstep - base: a stride-1 convolution with
    dilation dstep and top padding pad (negative where dy's first row lies above the
    window's, positive where below; its bottom padding is whatever P leaves)."""
    step, dstep, inverse = phase_steps(stride, dilation)
    g = stride // step
    if (phase + padding) % g:
        return PhaseTaps(0, 0, step, dstep, 0)
    first = (phase + padding) // g * inverse % step
    count = max(0, -(-(taps - first) // step))
    base = (phase + padding - first * dilation) // stride
    return PhaseTaps(first, count, step, dstep, (count - 1) * dstep - base)


def tma_dgrad_phase(weight: torch.Tensor, rows: PhaseTaps, cols: PhaseTaps
                    ) -> tuple[torch.Tensor, ConvGeometry]:
    """One stride phase of dx as a stride-1 forward convolution of dy: its weight
    ([C, count_r, count_s, K_out] contiguous, for ``tma_forward_launch``'s ``weight_rsc``)
    and geometry. W'[c, j'r, j's, k] = W[k, c, first_r + (count_r - 1 - j'r) * step_r, ...]:
    the phase's taps reversed, input and output channels swapped. At stride 1 this is the
    whole kernel flipped, with padding (R - 1) * DH - PH."""
    taps = weight[:, :, rows.first::rows.step, cols.first::cols.step].flip(2, 3)
    return (taps.permute(1, 2, 3, 0).contiguous(),
            ConvGeometry((rows.count, cols.count), padding=(rows.padding, cols.padding),
                         dilation=(rows.dilation, cols.dilation)))


def zero_fill_launch(y: torch.Tensor, config: TileConfig, sums: torch.Tensor | None = None,
                     sums_row: int = 0) -> Launch:
    """Zeros into y [N, C, P, Q] (any strides) in [block_m pixels x block_n channels]
    tiles, and into row ``sums_row`` of ``sums`` (dense [rows, 2, C] fp32) where given."""
    N, C, P, Q = y.shape
    return Launch(zero_fill_kernel,
                  (N * P, triton.cdiv(Q, config.block_m), triton.cdiv(C, config.block_n)),
                  args={"y_ptr": y, "sums_ptr": y if sums is None else sums, "P": P, "Q": Q,
                        "C": C, "sums_row": sums_row, **strided_args("y", y)},
                  extents={"y_ptr": strided_extent("y", (N, C, P, Q)),
                           "sums_ptr": UNUSED if sums is None
                           else dense(sums.shape[0], 2, C, dtypes=(torch.float32,))},
                  constexprs={"SUMS": sums is not None, "BLOCK_M": config.block_m,
                              "BLOCK_N": config.block_n},
                  num_warps=config.num_warps,
                  name=f"conv2d_zero_fill[{config.name},{str(y.dtype).removeprefix('torch.')}"
                       f"{'+sums' if sums is not None else ''}]")


class DgradPhase(NamedTuple):
    """One stride phase (ph, pw) of an input gradient: dx[:, :, ph::SH, pw::SW], reached by
    the taps ``rows`` x ``cols`` (``dgrad_phase_taps``; none: a zero fill)."""
    ph: int
    pw: int
    rows: PhaseTaps
    cols: PhaseTaps

    def zero(self) -> bool:
        """Whether no tap reaches the phase (its dx is zeros)."""
        return self.rows.count == 0 or self.cols.count == 0

    def sum_rows(self, dx_shape: tuple[int, ...], stride: tuple[int, int],
                 config: TileConfig) -> int:
        """The rows of a ``BatchNormGradEpilogue``'s sums this phase writes: one per M tile
        of its TMA launch (``tma_m_tiles``), one of zeros for a zero fill."""
        N, _, H, W = dx_shape
        if self.zero():
            return 1
        return tma_m_tiles(N, triton.cdiv(H - self.ph, stride[0]),
                           triton.cdiv(W - self.pw, stride[1]), config.block_m)


def dgrad_phases(geometry: ConvGeometry, height: int, width: int) -> list[DgradPhase]:
    """The stride phases of an input gradient of dx's ``height`` x ``width``, row-major; a
    phase past the input's end (H < SH) is left out."""
    (SH, SW), (PH, PW), (DH, DW) = geometry.stride, geometry.padding, geometry.dilation
    R, S = geometry.kernel
    return [DgradPhase(ph, pw, dgrad_phase_taps(ph, PH, R, SH, DH),
                       dgrad_phase_taps(pw, PW, S, SW, DW))
            for ph in range(min(SH, height)) for pw in range(min(SW, width))]


def tma_dgrad_sum_rows(dx_shape: tuple[int, ...], geometry: ConvGeometry,
                       config: TileConfig) -> int:
    """The rows of the sums a ``BatchNormGradEpilogue`` of ``tma_dgrad_launches`` takes for
    dx [N, C, H, W]: every phase's (``DgradPhase.sum_rows``), in phase order."""
    return sum(phase.sum_rows(dx_shape, geometry.stride, config)
               for phase in dgrad_phases(geometry, *dx_shape[2:]))


def tma_dgrad_launches(dy: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor,
                       geometry: ConvGeometry, operand: Operand, config: TileConfig, *,
                       grad_prologue: GradientPrologue | None = None,
                       epilogue: BatchNormGradEpilogue | None = None) -> list[Launch]:
    """The input gradient dx [N, C, H, W] (any strides) of a convolution with ``geometry``,
    from dy [N, K_out, P, Q] (``tma_gradient_supported``: the operands read through a
    descriptor that the caller gives, dy and the ``grad_prologue``'s y) and the weight
    [K_out, C, R, S] (any strides, copied per phase), on the TMA forward kernel: one launch
    per stride phase (ph, pw), a stride-1 convolution of dy (``tma_dgrad_phase``,
    ``dgrad_phase_taps``) written to the view dx[:, :, ph::SH, pw::SW]; a phase no tap
    reaches gets zeros (``zero_fill_launch``), a phase past the input's end (H < SH)
    nothing. dy is read through ``grad_prologue`` where given; with ``epilogue``, dx is its
    du * scale and each phase writes its rows of ``epilogue.sums`` (``tma_dgrad_sum_rows``
    of them, in phase order; a zero fill's row zeros). ``config.block_k`` must divide
    K_out."""
    SH, SW = geometry.stride
    if epilogue is not None:
        rows = tma_dgrad_sum_rows(dx.shape, geometry, config)
        if epilogue.sums.shape != (rows, 2, dx.shape[1]):
            raise ValueError(f"the sums of this input gradient are [{rows}, 2, {dx.shape[1]}]"
                             f" (tma_dgrad_sum_rows), got {list(epilogue.sums.shape)}")
    launches, sums_row = [], 0
    for phase in dgrad_phases(geometry, *dx.shape[2:]):
        dx_phase = dx[:, :, phase.ph::SH, phase.pw::SW]
        if phase.zero():
            launches.append(zero_fill_launch(dx_phase, config,
                                             None if epilogue is None else epilogue.sums,
                                             sums_row))
        else:
            phase_epilogue = None if epilogue is None else epilogue._replace(
                x=epilogue.x[:, :, phase.ph::SH, phase.pw::SW])
            weight_rsc, phase_geometry = tma_dgrad_phase(weight, phase.rows, phase.cols)
            launch = tma_forward_launch(dy, weight_rsc, None, None, None, False, dx_phase, None,
                                        phase_geometry, operand, config,
                                        grad_prologue=grad_prologue,
                                        grad_epilogue=phase_epilogue, sums_row=sums_row)
            launches.append(dataclasses.replace(
                launch, name=launch.name.replace("conv2d_forward_tma", "conv2d_dgrad_tma")))
        sums_row += phase.sum_rows(dx.shape, geometry.stride, config)
    return launches
