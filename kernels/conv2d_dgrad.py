"""Convolution input gradient (dgrad) as an implicit GEMM, groups=1.

dx[n, h, w, c] = sum over taps (r, s) and output channels k of dy[n, p, q, k] * W[k, c, r, s]
where h = p * SH - PH + r * DH (and likewise for w): GEMM M = input pixels, N = C,
K = taps x K_out, fp32 accumulation.

Stride is handled by decomposing the input by stride phase rather than by masking. Input
rows h with the same h mod SH are reached by the same taps: those r with
(h + PH - r * DH) divisible by SH, which form one residue class r0, r0 + STEP, r0 + 2 STEP, ...
(STEP = SH / gcd(SH, DH)). Each program owns one phase (grid axis 2 runs over the SH * SW
phases), visits only its phase's taps, and then p = i + base - j * DSTEP for the i-th row of
the phase and the j-th tap: no division and no wasted tap in the main loop. A masked
"visit every tap, skip the non-dividing ones" loop would spend 1 - 1/(SH * SW) of its tiles
on zeros: 3/4 at stride 2, 15/16 for AlexNet's stride-4 conv1. Rows that no window reaches
(a phase without taps, or the last rows when the input is not covered exactly by the
windows) get an empty or fully masked reduction and are stored as zeros.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .conv_geometry import ConvGeometry
from .launch import Extent, Launch
from .pool_tile import meta_tensor, strided_args, strided_extent
from .tensor_cores import dot, dot_precision, operand_kind, upcast_operands


@triton.jit
def split_pixels(start, count, H, W, BLOCK: tl.constexpr):
    """Pixels start .. start + BLOCK of an [N, H, W] grid as (n, h, w) and their mask.

    The flat index (int64 ``start``) may pass 2^31 while each coordinate cannot, so one
    scalar int64 division finds the image and the per-pixel divisions are int32."""
    image = start // (H * W)
    local = (start - image * (H * W)).to(tl.int32) + tl.arange(0, BLOCK)
    hw = local % (H * W)
    n = image.to(tl.int32) + local // (H * W)
    return n, hw // W, hw % W, tl.arange(0, BLOCK) < count - start


@triton.jit
def phase_taps(phase, PAD: tl.constexpr, TAPS: tl.constexpr, STRIDE: tl.constexpr,
               STEP: tl.constexpr, INVERSE: tl.constexpr):
    """The first tap t reaching input rows ``phase`` (mod STRIDE), i.e. the least t with
    t * DIL = phase + PAD (mod STRIDE) for the dilation DIL, and how many taps do (every
    STEP-th).

    With g = STRIDE / STEP = gcd(STRIDE, DIL) a tap exists iff g divides phase + PAD, and
    t = (phase + PAD) / g * INVERSE mod STEP, INVERSE being (DIL / g)^-1 mod STEP."""
    GCD: tl.constexpr = STRIDE // STEP
    first = ((phase + PAD) // GCD * INVERSE) % STEP
    reachable = ((phase + PAD) % GCD == 0).to(tl.int32)
    return first, (TAPS - first + STEP - 1) // STEP * reachable


@triton.jit
def conv2d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    N, H, W, P, Q, C, K_out,
    dy_sn, dy_sh, dy_sw, dy_sc, w_sk, w_sc, w_sr, w_ss, dx_sn, dx_sh, dx_sw, dx_sc,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    STEP_R: tl.constexpr, STEP_S: tl.constexpr, DSTEP_R: tl.constexpr, DSTEP_S: tl.constexpr,
    INVERSE_R: tl.constexpr, INVERSE_S: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    phase = tl.program_id(2)
    phase_h = phase // SW
    phase_w = phase % SW
    r0, taps_r = phase_taps(phase_h, PH, R, SH, STEP_R, INVERSE_R)
    s0, taps_s = phase_taps(phase_w, PW, S, SW, STEP_S, INVERSE_S)
    # This phase's input rows are phase_h, phase_h + SH, ...; row i meets tap j at output
    # row i + base_p - j * DSTEP_R (base_p is exact: r0 was chosen to make it divide).
    rows = (H - phase_h + SH - 1) // SH
    cols = (W - phase_w + SW - 1) // SW
    base_p = (phase_h + PH - r0 * DH) // SH
    base_q = (phase_w + PW - s0 * DW) // SW
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    count = rows.to(tl.int64) * cols * N
    # A phase past the input's end (H < SH) has no rows: count is 0, every pixel masked.
    n, i_h, i_w, m_ok = split_pixels(start, count, tl.maximum(rows, 1), tl.maximum(cols, 1),
                                     BLOCK_M)
    p0 = i_h + base_p
    q0 = i_w + base_q
    dy_rows = n.to(tl.int64) * dy_sn + p0.to(tl.int64) * dy_sh + q0.to(tl.int64) * dy_sw

    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C
    k = tl.arange(0, BLOCK_K)
    k_blocks = tl.cdiv(K_out, BLOCK_K)
    # Programs past their phase's pixel count (phases differ by a row or column) idle.
    steps = taps_r * taps_s * k_blocks * (start < count).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for step in range(steps):
        tap = step // k_blocks
        kk = (step % k_blocks) * BLOCK_K + k
        k_ok = kk < K_out
        j_r = tap // taps_s
        j_s = tap % taps_s
        p = p0 - j_r * DSTEP_R
        q = q0 - j_s * DSTEP_S
        row_ok = m_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        tap_offset = (j_r * DSTEP_R).to(tl.int64) * dy_sh + (j_s * DSTEP_S).to(tl.int64) * dy_sw
        a = tl.load(dy_ptr + (dy_rows - tap_offset)[:, None] + (kk * dy_sc)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r = r0 + j_r * STEP_R
        s = s0 + j_s * STEP_S
        b = tl.load(w_ptr + (r * w_sr + s * w_ss) + (kk * w_sk)[:, None] + (c * w_sc)[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = dot(a, b, acc, INPUT_PRECISION, UPCAST_OPERANDS)

    h = phase_h + i_h * SH
    w = phase_w + i_w * SW
    dx_rows = n.to(tl.int64) * dx_sn + h.to(tl.int64) * dx_sh + w.to(tl.int64) * dx_sw
    tl.store(dx_ptr + dx_rows[:, None] + (c.to(tl.int64) * dx_sc)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


def phase_steps(stride: int, dilation: int) -> tuple[int, int, int]:
    """(tap step, output-row step, inverse): taps reaching one stride phase repeat every
    stride / g (g = gcd(stride, dilation)) and move the output row by dilation / g; the
    inverse of dilation / g modulo the tap step finds a phase's first tap."""
    g = math.gcd(stride, dilation)
    return stride // g, dilation // g, pow(dilation // g, -1, stride // g)


def phase_pixels(N: int, H: int, W: int, geometry: ConvGeometry) -> int:
    """Input pixels of the largest stride phase: the M extent of the grid."""
    return N * triton.cdiv(H, geometry.stride[0]) * triton.cdiv(W, geometry.stride[1])


def dgrad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the B operand reads it: [R, S, C, K_out] dense, K_out (the GEMM's
    reduction axis) contiguous, the K-major layout the tensor-core operand wants."""
    return weight.permute(2, 3, 1, 0).contiguous()


def dgrad_launch(dy: torch.Tensor, weight_rsck: torch.Tensor, dx: torch.Tensor,
                 geometry: ConvGeometry, precision: str, config: configs.ConvConfig) -> Launch:
    """``weight_rsck`` is the [R, S, C, K_out]-shaped weight (any strides)."""
    N, C, H, W = dx.shape
    K_out, P, Q = dy.shape[1:]
    R, S = geometry.kernel
    (SH, SW), (DH, DW) = geometry.stride, geometry.dilation
    (step_r, dstep_r, inverse_r), (step_s, dstep_s, inverse_s) = (phase_steps(SH, DH),
                                                                  phase_steps(SW, DW))
    w_sr, w_ss, w_sc, w_sk = weight_rsck.stride()
    return Launch(
        conv2d_dgrad_kernel,
        (triton.cdiv(phase_pixels(N, H, W, geometry), config.block_m),
         triton.cdiv(C, config.block_n), SH * SW),
        args={"dy_ptr": dy, "w_ptr": weight_rsck, "dx_ptr": dx,
              "N": N, "H": H, "W": W, "P": P, "Q": Q, "C": C, "K_out": K_out,
              **strided_args("dy", dy),
              "w_sk": w_sk, "w_sc": w_sc, "w_sr": w_sr, "w_ss": w_ss,
              **strided_args("dx", dx)},
        extents={"dy_ptr": strided_extent("dy", (N, K_out, P, Q)),
                 "w_ptr": Extent((R, S, C, K_out), ("w_sr", "w_ss", "w_sc", "w_sk")),
                 "dx_ptr": strided_extent("dx", (N, C, H, W))},
        constexprs={"R": R, "S": S, "SH": SH, "SW": SW,
                    "PH": geometry.padding[0], "PW": geometry.padding[1], "DH": DH, "DW": DW,
                    "STEP_R": step_r, "STEP_S": step_s, "DSTEP_R": dstep_r,
                    "DSTEP_S": dstep_s, "INVERSE_R": inverse_r, "INVERSE_S": inverse_s,
                    "INPUT_PRECISION": precision,
                    "UPCAST_OPERANDS": upcast_operands(dy.dtype),
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                    "BLOCK_K": config.block_k},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_dgrad[{config.name}]")


def conv2d_input_grad(dy: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size,
                      memory_format: torch.memory_format, geometry: ConvGeometry,
                      allow_tf32: bool) -> torch.Tensor:
    """dx of a groups=1 conv2d: ``input_shape`` (N, C, H, W) in ``memory_format``, dy's dtype."""
    N, C, H, W = input_shape
    K_out = weight.shape[0]
    dx = backend.empty(input_shape, dy.dtype, dy.device, memory_format)
    config = configs.conv_dgrad_config(C, K_out, operand_kind(dy.dtype, allow_tf32),
                                       backend.INTERPRETER, phase_pixels(N, H, W, geometry))
    dgrad_launch(dy, dgrad_weight(weight), dx, geometry,
                 dot_precision(dy.dtype, allow_tf32), config)()
    return dx


def sm90_launches() -> list[Launch]:
    """Every GPU config, each on a layer that picks it (channels_last activations), plus
    AlexNet conv1 for a 16-phase stride-4 grid; one launch per (config, stride)."""
    layers = {  # name -> (N, C, H, W, K_out, geometry)
        "lenet2": (1024, 6, 14, 14, 16, ConvGeometry((5, 5))),
        "vgg1_2": (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),
        "vgg3_3": (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),
        "alex1": (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),
    }
    launches = {}
    for operand, dtype in (("16bit", torch.bfloat16), ("tf32", torch.float32),
                           ("ieee", torch.float32)):
        for N, C, H, W, K_out, geometry in layers.values():
            config = configs.conv_dgrad_config(C, K_out, operand, False,
                                               phase_pixels(N, H, W, geometry))
            launch = dgrad_launch(
                meta_tensor((N, K_out) + geometry.output_size(H, W), dtype),
                dgrad_weight(meta_tensor((K_out, C) + geometry.kernel, dtype)),
                meta_tensor((N, C, H, W), dtype), geometry,
                dot_precision(dtype, operand != "ieee"), config)
            name = f"{launch.name[:-1]},s{geometry.stride[0]}]"
            launches.setdefault(name, dataclasses.replace(launch, name=name))
    return list(launches.values())
