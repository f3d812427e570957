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

The M tiles are N * P * ceil(Q / BLOCK_M) (``tma_m_tiles``), not ceil(N*P*Q / BLOCK_M):
the STATS partials have one row per M tile. The epilogue is the pointer kernel's
(``conv2d.forward_epilogue``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # Triton's allocator has no public getter

from .conv2d import (ConvGeometry, epilogue_operands, forward_epilogue, gemm_constexprs,
                     next_channel_step)
from .launch import Launch, TileConfig, dense
from .nhwc import strided_args, strided_extent
from .runtime import INTERPRETER
from .tensor_cores import Operand, dot

# TMA needs 16-byte aligned strides (C a multiple of 8 in 16-bit) and a K step at least 16
# deep that stays inside one tap: C a multiple of 16.
TMA_CHANNEL_MULTIPLE = 16


@triton.jit
def conv2d_forward_tma_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, stats_ptr,
    N, C, C_TILES, H, W, P, Q, Q_TILES, K_OUT, K_TOTAL, NUM_M_TILES,
    bias_s, scale_s, shift_s, y_sn, y_sh, y_sw, y_sc,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C],
                                       strides=[H * W * C, W * C, C, 1],
                                       block_shape=[1, 1, BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K_OUT, K_TOTAL], strides=[K_TOTAL, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    # Channel tiles vary fastest, as in the pointer kernel: the programs sharing an input
    # tile run together.
    n_tiles = tl.cdiv(K_OUT, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles
    image_row = tile_m // Q_TILES  # n * P + p
    q0 = (tile_m % Q_TILES) * BLOCK_M
    n = image_row // P
    p = image_row % P
    h0 = p - PH
    w0 = q0 - PW
    k_out0 = tile_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    tap_h = 0
    tap_w = 0
    c0 = 0
    tap_column = 0  # the tap's first weight column, tap * C
    # At least one step, though C_TILES >= 1 (``conv2d``'s module docstring says why).
    for _ in range(tl.maximum(R * S * C_TILES, 1)):
        a = x_desc.load([n, h0 + tap_h, w0 + tap_w, c0]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([k_out0, tap_column + c0])
        acc = dot(a, b.T, acc, DOT_PRECISION, UPCAST_OPERANDS)
        c0, tap_column, tap_w, tap_h = next_channel_step(c0, tap_column, tap_w, tap_h, C, S,
                                                         DW, DH, BLOCK_K)

    q = q0 + tl.arange(0, BLOCK_M)
    k_out = k_out0 + tl.arange(0, BLOCK_N)
    forward_epilogue(acc, bias_ptr, scale_ptr, shift_ptr, y_ptr, stats_ptr, n.to(tl.int64),
                     p.to(tl.int64), q.to(tl.int64), q < Q, Q - q0, k_out, K_OUT, tile_m,
                     NUM_M_TILES, bias_s, scale_s, shift_s, y_sn, y_sh, y_sw, y_sc,
                     HAS_BIAS, STATS, HAS_SCALE_SHIFT, RELU, BLOCK_M)


# ----------------------------------------------------------------------------- host side

def tma_supported(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                  operand: Operand) -> bool:
    """Whether the TMA kernel runs this layer: tensor-core operands (16-bit or TF32), a dense
    channels_last input with C a multiple of ``TMA_CHANNEL_MULTIPLE``, stride 1, x and
    weight starting 16-byte aligned in their storage (TMA's global addresses must be; the
    weight matrix is a view of a channels_last weight), on a Hopper or later GPU (or no GPU:
    the interpreter, the compile report's meta tensors)."""
    on_hopper = x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] >= 9
    aligned = all(t.storage_offset() * t.element_size() % 16 == 0 for t in (x, weight))
    return (on_hopper and aligned and operand is not Operand.IEEE and x.dim() == 4
            and x.shape[1] % TMA_CHANNEL_MULTIPLE == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and geometry.stride == (1, 1))


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


def tma_forward_launch(x: torch.Tensor, weight_rsc: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
                       y: torch.Tensor, stats: torch.Tensor | None, geometry: ConvGeometry,
                       operand: Operand, config: TileConfig) -> Launch:
    """The TMA launch for a ``tma_supported`` x [N, C, H, W] (channels_last), ``weight_rsc``
    [K_out, R, S, C] contiguous, [K_out] bias, scale and shift (any stride), y [N, K_out, P,
    Q] (any strides) and, for the STATS epilogue, a dense [3, ``tma_m_tiles``, K_out] fp32
    ``stats``. ``config.block_k`` must divide C."""
    N, C, H, W = x.shape
    K_out, R, S, _ = weight_rsc.shape
    P, Q = y.shape[2:]
    q_tiles = triton.cdiv(Q, config.block_m)
    m_tiles = N * P * q_tiles
    if x.is_cuda and not INTERPRETER:
        _set_scratch_allocator()
    epilogue = epilogue_operands(y, bias, scale, shift, relu, stats, m_tiles)
    return Launch(
        conv2d_forward_tma_kernel, (m_tiles * triton.cdiv(K_out, config.block_n),),
        args={"x_ptr": x, "w_ptr": weight_rsc, "y_ptr": y, **epilogue.args,
              "N": N, "C": C, "C_TILES": C // config.block_k, "H": H, "W": W, "P": P,
              "Q": Q, "Q_TILES": q_tiles, "K_OUT": K_out, "K_TOTAL": R * S * C,
              "NUM_M_TILES": m_tiles, **strided_args("y", y)},
        extents={"x_ptr": strided_extent("x", (N, C, H, W), dense_nhwc=True),
                 "w_ptr": dense(K_out, R * S * C),
                 "y_ptr": strided_extent("y", (N, K_out, P, Q)), **epilogue.extents},
        constexprs={"R": R, "S": S, **geometry.constexprs(), **epilogue.constexprs,
                    **gemm_constexprs(operand, x.dtype, config)},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_forward_tma[{config.name},{epilogue.name_suffix(x.dtype)}]")
