"""Convolution forward as an implicit GEMM over NHWC, with a fused epilogue.

GEMM view: M = N*P*Q output pixels, N = K_out output channels, K = R*S*C. A program owns a
[BLOCK_M pixels x BLOCK_N channels] tile of the output and never materializes im2col: each
K step gathers its [BLOCK_M x BLOCK_K] slice of the input straight from the strided tensor
(channels_last is the coalesced fast path; any strides work) and multiplies it with a
[BLOCK_K x BLOCK_N] slice of the weight. Accumulation is fp32; pixel offsets are int64.

Two main loops, picked by a constexpr:
* channels (C >= 16): one flat loop over (tap r, s) x (C in BLOCK_K chunks). The per-pixel
  index math (n, p, q, the input base offset) is done once; a step adds a scalar tap offset
  and compares the tap's row/column with the bounds. One flat loop (not nested) so Triton
  pipelines across taps too.
* flattened K (C < 16: LeNet, AlexNet and VGG first layers): K runs over (r, s, c) together,
  so a 3-channel 3x3 layer has K = 27 in one 32-deep step instead of 9 steps of 16-wide tiles
  that are 81 % padding.

The weight is read as [K_out, R*S*C] with (r, s, c) contiguous: free for a channels_last
weight, one copy of the (small) weight per call otherwise (VGG's largest, 512x512x3x3 bf16,
is 4.7 MB).

Epilogue, constexpr flags applied in this order on the fp32 accumulator:
HAS_BIAS (+ bias[k], any stride), STATS (Welford partials of this tile: count, mean, M2 per channel,
of conv + bias, for BatchNorm's batch statistics; written to a [3, M tiles, K_out] fp32
buffer and merged on the host with Chan's formula, no atomics), HAS_SCALE_SHIFT
(* scale[k] + shift[k], e.g. an eval-mode BatchNorm folded in), RELU.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .conv_geometry import ConvGeometry
from .launch import UNUSED, Extent, Launch, dense, vector
from .pool_tile import meta_tensor, split_pixel, strided_args, strided_extent
from .tensor_cores import cudnn_conv_allows_tf32, dot, operand_kind, upcast_operands
from .welford import tile_statistics


@triton.jit
def _channel_tile_loop(acc, x_ptr, w_ptr, pixel_base, h0, w0, m_ok, w_cols, k_out_ok,
                       C, C_TILES, H, W, x_sh, x_sw, x_sc,
                       S: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, R_TIMES_S,
                       EVEN_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       UPCAST_OPERANDS: tl.constexpr, BLOCK_K: tl.constexpr):
    """K = (r, s) taps x C in BLOCK_K chunks (C_TILES of them), as one flat loop."""
    lanes = tl.arange(0, BLOCK_K)
    for step in range(0, R_TIMES_S * C_TILES):
        tap = step // C_TILES
        c = (step - tap * C_TILES) * BLOCK_K + lanes
        r = tap // S
        s = tap - r * S
        h = h0 + r * DH
        w = w0 + s * DW
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        tap_offset = (r * DH).to(tl.int64) * x_sh + (s * DW).to(tl.int64) * x_sw
        a_ptrs = x_ptr + (pixel_base + tap_offset)[:, None] + (c * x_sc)[None, :]
        b_ptrs = w_ptr + (tap * C + c)[:, None] + w_cols[None, :]
        if EVEN_C:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_out_ok[None, :], other=0.0)
        else:
            c_ok = c < C
            a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=c_ok[:, None] & k_out_ok[None, :], other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
    return acc


@triton.jit
def _flat_k_loop(acc, x_ptr, w_ptr, pixel_base, h0, w0, m_ok, w_cols, k_out_ok,
                 C, H, W, x_sh, x_sw, x_sc, K_TOTAL,
                 S: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """K = (r, s, c) flattened, c fastest: no padding per tap for small C."""
    lanes = tl.arange(0, BLOCK_K)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        k = k0 + lanes
        k_ok = k < K_TOTAL
        tap = k // C
        c = k - tap * C
        r = tap // S
        s = tap - r * S
        h = h0[:, None] + (r * DH)[None, :]
        w = w0[:, None] + (s * DW)[None, :]
        a_mask = (m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W))
        column_offset = (r * DH).to(tl.int64) * x_sh + (s * DW).to(tl.int64) * x_sw + c * x_sc
        a = tl.load(x_ptr + pixel_base[:, None] + column_offset[None, :], mask=a_mask,
                    other=0.0)
        b = tl.load(w_ptr + k[:, None] + w_cols[None, :],
                    mask=k_ok[:, None] & k_out_ok[None, :], other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
    return acc


@triton.jit
def _store_welford_partials(acc, m_ok, k_out, k_out_ok, tile_m, M, K_OUT, NUM_M_TILES,
                            stats_ptr, BLOCK_M: tl.constexpr):
    """count, mean and M2 of this tile's valid rows, per channel (``welford.tile_statistics``)."""
    count = tl.minimum(M - tile_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
    mean, m2 = tile_statistics(acc, m_ok, BLOCK_M)
    plane = NUM_M_TILES.to(tl.int64) * K_OUT
    offsets = tile_m.to(tl.int64) * K_OUT + k_out
    tl.store(stats_ptr + offsets, tl.zeros_like(mean) + count, mask=k_out_ok)
    tl.store(stats_ptr + plane + offsets, mean, mask=k_out_ok)
    tl.store(stats_ptr + 2 * plane + offsets, m2, mask=k_out_ok)


@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, stats_ptr,
    M, C, C_TILES, H, W, P, Q, K_OUT, K_TOTAL, NUM_M_TILES,
    x_sn, x_sh, x_sw, x_sc, w_sk, bias_s, scale_s, shift_s, y_sn, y_sh, y_sw, y_sc,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FLAT_K: tl.constexpr, EVEN_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, STATS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Channel tiles vary fastest, so the programs sharing an input tile run together and
    # the input is read from DRAM about once (the weight stays in L2).
    n_tiles = tl.cdiv(K_OUT, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles
    m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_out = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    k_out_ok = k_out < K_OUT
    n, p, q = split_pixel(m, P, Q)
    h0 = (p * SH - PH).to(tl.int32)
    w0 = (q * SW - PW).to(tl.int32)
    pixel_base = n * x_sn + h0.to(tl.int64) * x_sh + w0.to(tl.int64) * x_sw
    w_cols = k_out * w_sk

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if FLAT_K:
        acc = _flat_k_loop(acc, x_ptr, w_ptr, pixel_base, h0, w0, m_ok, w_cols, k_out_ok,
                           C, H, W, x_sh, x_sw, x_sc, K_TOTAL, S, DH, DW,
                           DOT_PRECISION, UPCAST_OPERANDS, BLOCK_K)
    else:
        acc = _channel_tile_loop(acc, x_ptr, w_ptr, pixel_base, h0, w0, m_ok, w_cols,
                                 k_out_ok, C, C_TILES, H, W, x_sh, x_sw, x_sc, S, DH, DW,
                                 R * S,
                                 EVEN_C, DOT_PRECISION, UPCAST_OPERANDS, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_out * bias_s, mask=k_out_ok,
                       other=0.0).to(tl.float32)[None, :]
    if STATS:
        _store_welford_partials(acc, m_ok, k_out, k_out_ok, tile_m, M, K_OUT, NUM_M_TILES,
                                stats_ptr, BLOCK_M)
    if HAS_SCALE_SHIFT:
        scale = tl.load(scale_ptr + k_out * scale_s, mask=k_out_ok, other=0.0)
        shift = tl.load(shift_ptr + k_out * shift_s, mask=k_out_ok, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    y_offsets = (n * y_sn + p * y_sh + q * y_sw)[:, None] + (k_out * y_sc)[None, :]
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_out_ok[None, :])


# ----------------------------------------------------------------------------- host side

class WelfordPartials(NamedTuple):
    """Per-M-tile BatchNorm statistics of a conv output, each [M tiles, K_out] fp32."""
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def merge_welford_partials(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                           unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, variance) from [tiles, channels] partials, Chan's parallel formula
    over all tiles at once: M2 = sum M2_i + sum n_i (mean_i - mean)^2, the mean summed as
    deviations from the fullest tile's (as ``welford.chan_merge``). Deterministic."""
    total = count.sum(0)
    pivot = mean.gather(0, count.argmax(0, keepdim=True))
    merged_mean = pivot[0] + (count * (mean - pivot)).sum(0) / total
    merged_m2 = m2.sum(0) + (count * (mean - merged_mean).square()).sum(0)
    return merged_mean, merged_m2 / (total - 1 if unbiased else total)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[K_out, C, R, S] -> [K_out, R, S, C] contiguous, the [K_out, R*S*C] GEMM operand
    (a view, no copy, for a channels_last weight)."""
    return weight.permute(0, 2, 3, 1).contiguous()


def forward_launch(x: torch.Tensor, weight_rsc: torch.Tensor, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool,
                   y: torch.Tensor, stats: torch.Tensor | None, geometry: ConvGeometry,
                   operand: str, config: configs.ConvConfig) -> Launch:
    """The launch for x [N, C, H, W] (any strides), ``weight_rsc`` [K_out, R, S, C] with
    (r, s, c) contiguous, and [K_out] bias, scale and shift (any stride)."""
    N, C, H, W = x.shape
    K_out, R, S, _ = weight_rsc.shape
    P, Q = y.shape[2:]
    M = N * P * Q
    m_tiles = triton.cdiv(M, config.block_m)
    flat = C < configs.CONV_SMALL_C
    vectors = {"bias": bias, "scale": scale, "shift": shift}
    return Launch(
        conv2d_forward_kernel, (m_tiles * triton.cdiv(K_out, config.block_n),),
        args={"x_ptr": x, "w_ptr": weight_rsc, "y_ptr": y,
              **{f"{name}_ptr": y if t is None else t for name, t in vectors.items()},
              "stats_ptr": stats if stats is not None else y,
              "M": M, "C": C, "C_TILES": triton.cdiv(C, config.block_k), "H": H, "W": W,
              "P": P, "Q": Q, "K_OUT": K_out, "K_TOTAL": R * S * C, "NUM_M_TILES": m_tiles,
              **strided_args("x", x), "w_sk": weight_rsc.stride(0), **strided_args("y", y),
              **{f"{name}_s": 0 if t is None else t.stride(0) for name, t in vectors.items()}},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "w_ptr": Extent((K_out, R * S * C), ("w_sk", 1)),
                 "y_ptr": strided_extent("y", (N, K_out, P, Q)),
                 "bias_ptr": vector(bias, K_out, "bias_s"),
                 "scale_ptr": vector(scale, K_out, "scale_s", (torch.float32,)),
                 "shift_ptr": vector(shift, K_out, "shift_s", (torch.float32,)),
                 "stats_ptr": UNUSED if stats is None
                 else dense(3, m_tiles, K_out, dtypes=(torch.float32,))},
        constexprs={"R": R, "S": S, "SH": geometry.stride[0], "SW": geometry.stride[1],
                    "PH": geometry.padding[0], "PW": geometry.padding[1],
                    "DH": geometry.dilation[0], "DW": geometry.dilation[1],
                    "FLAT_K": flat, "EVEN_C": C % config.block_k == 0,
                    "HAS_BIAS": bias is not None, "STATS": stats is not None,
                    "HAS_SCALE_SHIFT": scale is not None, "RELU": relu,
                    "DOT_PRECISION": "ieee" if operand == "ieee" else "tf32",
                    "UPCAST_OPERANDS": upcast_operands(x.dtype),
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                    "BLOCK_K": config.block_k},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_forward[{config.name},{_DTYPE_NAMES[x.dtype]}"
             f"{_epilogue_suffix(bias is not None, stats is not None, scale is not None, relu)}]")


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _epilogue_suffix(bias: bool, stats: bool, scale_shift: bool, relu: bool) -> str:
    flags = (("bias", bias), ("stats", stats), ("scale_shift", scale_shift), ("relu", relu))
    return "".join(f"+{flag}" for flag, on in flags if on)


def _forward_config(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry,
                    operand: str) -> configs.ConvConfig:
    N, C, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    reduction = C * weight.shape[2] * weight.shape[3]
    return configs.conv_forward_config(C, weight.shape[0], reduction, operand,
                                       backend.INTERPRETER, N * P * Q)


def stats_tiles(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> int:
    """The M tiles of the Welford partials ``conv2d_forward`` writes with ``stats`` (their
    shape is [3, tiles, K_out]): what a shape function needs to know without running it."""
    N, _, H, W = x.shape
    P, Q = geometry.output_size(H, W)
    config = _forward_config(x, weight, geometry,
                             operand_kind(x.dtype, cudnn_conv_allows_tf32()))
    return triton.cdiv(N * P * Q, config.block_m)


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   geometry: ConvGeometry, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, relu: bool = False,
                   stats: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = conv2d(x, weight) (+ bias) [* scale + shift] [ReLU], in x's dtype and memory
    format, and when ``stats`` the Welford partials of conv + bias: one [3, tiles, K_out] fp32
    buffer of (count, mean, M2) (``WelfordPartials(*buffer.unbind(0))``). x is 4-D; scale and
    shift are per-output-channel fp32; fp32 uses TF32 when torch allows it for cuDNN."""
    N, _, H, W = x.shape
    K_out = weight.shape[0]
    P, Q = geometry.output_size(H, W)
    y = backend.empty((N, K_out, P, Q), x.dtype, x.device, backend.memory_format_of(x))
    operand = operand_kind(x.dtype, cudnn_conv_allows_tf32())
    weight_rsc = weight_matrix(weight)
    config = _forward_config(x, weight, geometry, operand)
    m_tiles = triton.cdiv(N * P * Q, config.block_m)
    partials = backend.empty((3, m_tiles, K_out), torch.float32, x.device) if stats else None
    forward_launch(x, weight_rsc, bias, scale, shift, relu, y, partials, geometry, operand,
                   config)()
    return y, partials


# The layer each config is meant for (channels_last, batch 64): C, K_out, size, kernel, pad.
_SM90_LAYERS = {
    "flat_n16": (1, 6, 32, 5, 0),         # LeNet conv1
    "flat_n64": (3, 64, 224, 3, 1),       # VGG conv1_1
    "chan_n64": (64, 64, 224, 3, 1),      # VGG conv1_2
    "chan_n128": (256, 256, 56, 3, 1),    # VGG conv3_3
    "fp32": (256, 256, 56, 3, 1),         # fp32 without TF32: VGG conv3_3
}


def sm90_launches() -> list[Launch]:
    """Every GPU config on its layer with the bias epilogue; the 16-bit tiles, where register
    pressure is highest, also with the training (bias + stats) and eval (bias + scale/shift +
    ReLU) epilogues; and one fp16 launch (bf16's twin)."""
    launches = []
    for name, config in configs.CONV_FORWARD_CONFIGS.items():
        layer, operand = name.rsplit("_", 1)
        dtypes = {"16bit": [torch.bfloat16], "tf32": [torch.float32], "ieee": [torch.float32]}
        if name == "chan_n128_16bit":
            dtypes["16bit"].append(torch.float16)
        for dtype in dtypes[operand]:
            launches += _sm90_layer_launches(config, operand, dtype, *_SM90_LAYERS[layer])
    return launches


def _sm90_layer_launches(config: configs.ConvConfig, operand: str, dtype: torch.dtype, C: int,
                         K_out: int, size: int, k: int, pad: int) -> list[Launch]:
    geometry = ConvGeometry((k, k), padding=(pad, pad))
    P, Q = geometry.output_size(size, size)
    x = meta_tensor((64, C, size, size), dtype)
    y = meta_tensor((64, K_out, P, Q), dtype)
    weight_rsc = torch.empty((K_out, k, k, C), dtype=dtype, device="meta")
    bias = torch.empty((K_out,), dtype=dtype, device="meta")
    per_channel = torch.empty((K_out,), dtype=torch.float32, device="meta")
    m_tiles = triton.cdiv(64 * P * Q, config.block_m)
    stats = torch.empty((3, m_tiles, K_out), dtype=torch.float32, device="meta")
    epilogues = [(None, None, False)]
    if operand == "16bit" and dtype == torch.bfloat16:
        epilogues += [(stats, None, False), (None, per_channel, True)]
    return [forward_launch(x, weight_rsc, bias, scale, scale, relu, y, partials, geometry,
                           operand, config)
            for partials, scale, relu in epilogues]
