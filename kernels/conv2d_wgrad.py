"""Convolution weight and bias gradients (wgrad) as a split-K implicit GEMM, groups=1.

dW[k, c, r, s] = sum over pixels (n, p, q) of dy[n, p, q, k] * x[n, p*SH - PH + r*DH,
q*SW - PW + s*DW, c]: GEMM M = (r, s, c) flattened, N = K_out, K = N*P*Q. Flattening
(r, s, c) into M lets a first layer (C = 1 or 3) fill its tiles with real columns (27 for a
3x3 RGB layer) instead of padding every tap; when C is a multiple of the M tile, a tile stays
inside one tap and its patch load is one channel run per pixel.

The pixel reduction is long (N*P*Q, a million and more) while the output is small, so it is
split across programs: split i reduces its own pixel range into an fp32 partial, and a second
tiny kernel sums the partials in split order. No atomics, bitwise deterministic. With one
split the main kernel writes dW (and db) directly.

The bias gradient db[k] = sum of dy[., ., ., k] comes from the dy tiles the GEMM loads
anyway: the programs holding the first (r, s, c) tile also sum each dy tile into per-split
bias partials, merged the same way. No extra pass over dy.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .conv2d_dgrad import split_pixels
from .conv_geometry import ConvGeometry
from .launch import UNUSED, Extent, Launch, dense
from .pool_tile import meta_tensor, strided_args, strided_extent
from .tensor_cores import dot, dot_precision, operand_kind, upcast_operands

# Hopper's SM count, used where no device can be asked (the compile check's meta tensors).
SM90_SM_COUNT = 132


@triton.jit
def wgrad_reduce(x_ptr, dy_ptr, x_cols, tap_h, tap_w, col_ok, k, k_ok, start, end, steps,
                 H, W, P, Q, x_sn, x_sh, x_sw, dy_sn, dy_sh, dy_sw, dy_sc,
                 SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                 WITH_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum of x_patch^T @ dy over pixels start .. end (and of dy itself, WITH_BIAS).

    ``tap_h``/``tap_w`` are the (r*DH, s*DW) tap offsets of the M columns: scalars when the
    tile lies in one tap, [BLOCK_M, 1] columns otherwise; ``x_cols`` their address offsets."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias = tl.zeros((BLOCK_N,), tl.float32)
    for step in range(steps):
        n, p, q, pix_ok = split_pixels(start + step * BLOCK_K, end, P, Q, BLOCK_K)
        h0 = p * SH - PH
        w0 = q * SW - PW
        x_rows = n.to(tl.int64) * x_sn + h0.to(tl.int64) * x_sh + w0.to(tl.int64) * x_sw
        h = h0[None, :] + tap_h
        w = w0[None, :] + tap_w
        x_ok = pix_ok[None, :] & col_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a = tl.load(x_ptr + x_cols + x_rows[None, :], mask=x_ok, other=0.0)
        dy_rows = n.to(tl.int64) * dy_sn + p.to(tl.int64) * dy_sh + q.to(tl.int64) * dy_sw
        b = tl.load(dy_ptr + dy_rows[:, None] + (k * dy_sc)[None, :],
                    mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot(a, b, acc, INPUT_PRECISION, UPCAST_OPERANDS)
        if WITH_BIAS:
            bias += tl.sum(b.to(tl.float32), axis=0)
    return acc, bias


@triton.jit
def conv2d_wgrad_kernel(
    x_ptr, dy_ptr, out_ptr, bias_out_ptr,
    H, W, P, Q, C, K_out, pixels, split_pixels_count,
    x_sn, x_sh, x_sw, x_sc, dy_sn, dy_sh, dy_sw, dy_sc,
    o_split, o_sr, o_ss, o_sc, o_sk, b_split,
    R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TAP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if TAP_ALIGNED:  # C % BLOCK_M == 0: one tap, a run of channels
        tap = (pid_m * BLOCK_M) // C
        r = tap // S
        s = tap % S
        c = j - tap * C
        tap_h = r * DH
        tap_w = s * DW
    else:
        r = j // (S * C)
        s = (j // C) % S
        c = j % C
        tap_h = (r * DH)[:, None]
        tap_w = (s * DW)[:, None]
    col_ok = (j < R * S * C)[:, None]
    x_cols = (tap_h.to(tl.int64) * x_sh + tap_w.to(tl.int64) * x_sw
              + (c.to(tl.int64) * x_sc)[:, None])
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K_out

    start = split.to(tl.int64) * split_pixels_count
    end = tl.minimum(start + split_pixels_count, pixels)
    steps = tl.cdiv(end - start, BLOCK_K).to(tl.int32)
    # The bias sum rides on the programs of the first M tile only: one compiled loop with
    # the sum, one without, so the other programs pay nothing for it.
    with_bias = (pid_m == 0) if HAS_BIAS else False
    if with_bias:
        acc, bias = wgrad_reduce(x_ptr, dy_ptr, x_cols, tap_h, tap_w, col_ok, k, k_ok, start,
                                 end, steps, H, W, P, Q, x_sn, x_sh, x_sw, dy_sn, dy_sh, dy_sw,
                                 dy_sc, SH, SW, PH, PW, INPUT_PRECISION, UPCAST_OPERANDS, True,
                                 BLOCK_M, BLOCK_N, BLOCK_K)
        tl.store(bias_out_ptr + split * b_split + k, bias.to(bias_out_ptr.dtype.element_ty),
                 mask=k_ok)
    else:
        acc, bias = wgrad_reduce(x_ptr, dy_ptr, x_cols, tap_h, tap_w, col_ok, k, k_ok, start,
                                 end, steps, H, W, P, Q, x_sn, x_sh, x_sw, dy_sn, dy_sh, dy_sw,
                                 dy_sc, SH, SW, PH, PW, INPUT_PRECISION, UPCAST_OPERANDS, False,
                                 BLOCK_M, BLOCK_N, BLOCK_K)
    out = split.to(tl.int64) * o_split + r * o_sr + s * o_ss + c * o_sc
    tl.store(out_ptr + out[:, None] + (k * o_sk)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=col_ok & k_ok[None, :])


@triton.jit
def sum_splits_kernel(partial_ptr, out_ptr, splits, numel, D1, D2, D3,
                      o_s0, o_s1, o_s2, o_s3, BLOCK: tl.constexpr):
    """out[e] = sum of partial[0 .. splits-1, e] in split order, for a dense [D0, D1, D2, D3]
    partial index e, stored through out's own strides."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    offsets = e.to(tl.int64)
    for _ in range(splits):
        acc += tl.load(partial_ptr + offsets, mask=ok, other=0.0)
        offsets += numel
    i3 = e % D3
    i2 = (e // D3) % D2
    i1 = (e // (D2 * D3)) % D1
    i0 = e // (D1 * D2 * D3)
    tl.store(out_ptr + i0 * o_s0 + i1 * o_s1 + i2 * o_s2 + i3 * o_s3,
             acc.to(out_ptr.dtype.element_ty), mask=ok)


def split_reduction(pixels: int, splits: int, block_k: int) -> tuple[int, int]:
    """(splits, pixels per split): whole BLOCK_K steps per split, and no empty split."""
    per_split = max(1, triton.cdiv(triton.cdiv(pixels, splits), block_k)) * block_k
    return max(1, triton.cdiv(pixels, per_split)), per_split


def wgrad_launch(x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor,
                 bias_out: torch.Tensor | None, splits: int, per_split: int,
                 geometry: ConvGeometry, precision: str, config: configs.ConvConfig) -> Launch:
    """``out`` [splits, R, S, C, K_out] (any strides) receives split i's dW, ``bias_out``
    [splits, K_out] (K_out contiguous) its db: partial buffers, or with one split views of
    dW and db themselves."""
    N, C, H, W = x.shape
    K_out, P, Q = dy.shape[1:]
    R, S = geometry.kernel
    o_split, o_sr, o_ss, o_sc, o_sk = out.stride()
    return Launch(
        conv2d_wgrad_kernel,
        (triton.cdiv(R * S * C, config.block_m), triton.cdiv(K_out, config.block_n), splits),
        args={"x_ptr": x, "dy_ptr": dy, "out_ptr": out,
              "bias_out_ptr": bias_out if bias_out is not None else out,
              "H": H, "W": W, "P": P, "Q": Q, "C": C, "K_out": K_out, "pixels": N * P * Q,
              "split_pixels_count": per_split,
              **strided_args("x", x), **strided_args("dy", dy),
              "o_split": o_split, "o_sr": o_sr, "o_ss": o_ss, "o_sc": o_sc, "o_sk": o_sk,
              "b_split": bias_out.stride(0) if bias_out is not None else 0},
        extents={"x_ptr": strided_extent("x", (N, C, H, W)),
                 "dy_ptr": strided_extent("dy", (N, K_out, P, Q)),
                 "out_ptr": Extent((splits, R, S, C, K_out),
                                   ("o_split", "o_sr", "o_ss", "o_sc", "o_sk")),
                 "bias_out_ptr": UNUSED if bias_out is None
                 else Extent((splits, K_out), ("b_split", 1))},
        constexprs={"R": R, "S": S, "SH": geometry.stride[0], "SW": geometry.stride[1],
                    "PH": geometry.padding[0], "PW": geometry.padding[1],
                    "DH": geometry.dilation[0], "DW": geometry.dilation[1],
                    "TAP_ALIGNED": C % config.block_m == 0, "HAS_BIAS": bias_out is not None,
                    "INPUT_PRECISION": precision, "UPCAST_OPERANDS": upcast_operands(x.dtype),
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                    "BLOCK_K": config.block_k},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=f"conv2d_wgrad[{config.name}]")


MERGE_BLOCK = 1024


def merge_launch(partial: torch.Tensor, out: torch.Tensor) -> Launch:
    """Sum a dense [splits, D0, D1, D2, D3] fp32 partial over splits into ``out``
    [D0, D1, D2, D3] (any strides)."""
    splits, d0, d1, d2, d3 = partial.shape
    s0, s1, s2, s3 = out.stride()
    return Launch(sum_splits_kernel, (triton.cdiv(d0 * d1 * d2 * d3, MERGE_BLOCK),),
                  args={"partial_ptr": partial, "out_ptr": out, "splits": splits,
                        "numel": d0 * d1 * d2 * d3, "D1": d1, "D2": d2, "D3": d3,
                        "o_s0": s0, "o_s1": s1, "o_s2": s2, "o_s3": s3},
                  extents={"partial_ptr": dense(splits, d0, d1, d2, d3,
                                                dtypes=(torch.float32,)),
                           "out_ptr": Extent((d0, d1, d2, d3), ("o_s0", "o_s1", "o_s2", "o_s3"))},
                  constexprs={"BLOCK": MERGE_BLOCK}, num_warps=4, name="conv2d_wgrad_merge")


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM90_SM_COUNT


def wgrad_plan(x: torch.Tensor, dy: torch.Tensor, weight_shape: torch.Size,
               need_bias_grad: bool, geometry: ConvGeometry, allow_tf32: bool,
               interpreter: bool) -> tuple[list[Launch], torch.Tensor, torch.Tensor | None]:
    """The launches of one weight gradient and the dW, db they fill (dW and db are
    allocated here; so is the fp32 partial buffer when the reduction is split)."""
    K_out, C, R, S = weight_shape
    N, _, P, Q = dy.shape
    config = configs.conv_wgrad_config(C, K_out, operand_kind(x.dtype, allow_tf32),
                                       interpreter, R * S, N * P * Q)
    tiles = triton.cdiv(R * S * C, config.block_m) * triton.cdiv(K_out, config.block_n)
    splits, per_split = split_reduction(
        N * P * Q, configs.conv_wgrad_splits(tiles, N * P * Q, config.block_k, interpreter,
                                             sm_count(x.device)),
        config.block_k)
    dw = backend.empty(weight_shape, x.dtype, x.device)
    db = backend.empty((K_out,), x.dtype, x.device) if need_bias_grad else None
    precision = dot_precision(x.dtype, allow_tf32)
    dw_rsck = dw.permute(2, 3, 1, 0)  # the (r, s, c, k) order of the GEMM's M x N
    if splits == 1:
        main = wgrad_launch(x, dy, dw_rsck[None], None if db is None else db[None], 1,
                            per_split, geometry, precision, config)
        return [main], dw, db
    partial = backend.empty((splits, R, S, C, K_out), torch.float32, x.device)
    bias_partial = (backend.empty((splits, 1, 1, 1, K_out), torch.float32, x.device)
                    if need_bias_grad else None)
    launches = [wgrad_launch(x, dy, partial,
                             None if bias_partial is None else bias_partial.view(splits, K_out),
                             splits, per_split, geometry, precision, config),
                merge_launch(partial, dw_rsck)]
    if need_bias_grad:
        launches.append(merge_launch(bias_partial, db.view(1, 1, 1, K_out)))
    return launches, dw, db


def conv2d_weight_grad(x: torch.Tensor, dy: torch.Tensor, weight_shape: torch.Size,
                       geometry: ConvGeometry, need_bias_grad: bool, allow_tf32: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW (``weight_shape``, contiguous) and, if asked, db of a groups=1 conv2d with C >= 1,
    both in x's dtype, accumulated in fp32."""
    launches, dw, db = wgrad_plan(x, dy, weight_shape, need_bias_grad, geometry, allow_tf32,
                                  backend.INTERPRETER)
    for launch in launches:
        launch()
    return dw, db


def sm90_launches() -> list[Launch]:
    """Every GPU config, each on a layer that picks it (channels_last activations), with
    the split-K merge it brings."""
    layers = {  # name -> (N, C, H, W, K_out, geometry)
        "lenet1": (1024, 1, 32, 32, 6, ConvGeometry((5, 5))),
        "vgg1_1": (64, 3, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),
        "alex1": (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),
        "vgg1_2": (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),
        "alex2": (128, 64, 27, 27, 192, ConvGeometry((5, 5), padding=(2, 2))),
        "vgg3_3": (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),
    }
    launches = {}
    for operand, dtype in (("16bit", torch.bfloat16), ("tf32", torch.float32),
                           ("ieee", torch.float32)):
        for layer, (N, C, H, W, K_out, geometry) in layers.items():
            x = meta_tensor((N, C, H, W), dtype)
            dy = meta_tensor((N, K_out) + geometry.output_size(H, W), dtype)
            plan, _, _ = wgrad_plan(x, dy, torch.Size((K_out, C) + geometry.kernel), True,
                                    geometry, operand != "ieee", False)
            main = plan[0]
            path = "tap" if main.constexprs["TAP_ALIGNED"] else "flat"
            name = f"{main.name[:-1]},{path}]"
            launches.setdefault(name, dataclasses.replace(main, name=name))
            launches.setdefault(plan[1].name, plan[1])
    return list(launches.values())
