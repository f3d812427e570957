"""Compile every kernel config a launcher can choose for Hopper (sm_90a) on a machine with no
GPU, and report what the hardware would get: registers, spills, shared memory, and whether
the matrix instructions are the fast ones (HGMMA) or not (HMMA).

    python -m fastarch.sm90            # table
    python -m fastarch.sm90 --json     # one JSON object per line

Each kernel family has a builder here (``FAMILY_LAUNCHES``): the ``Launch`` records its host
module builds for every config in its tables, on meta tensors of representative layers.
TRITON_INTERPRET must be off in this process
(``@triton.jit`` would otherwise hand out interpreter functions that cannot be compiled).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch
import triton

from fastarch.kernels import avg_pool, batch_norm, conv2d, conv2d_backward, max_pool
from fastarch.kernels import dropout, linear, relu
from fastarch.kernels.batch_norm import BackwardSums, BatchNormStatistics
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.launch import Launch, TileConfig
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import batch_norm as batch_norm_ops
from fastarch.ops import conv2d as conv_ops
from fastarch.ops import dropout as dropout_ops
from fastarch.ops import linear as linear_ops
from fastarch.ops import relu as relu_ops
from fastarch.ops.common import NHWC_TILES

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                 "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                 "bool": "i1"}


def triton_type(value: Any) -> str:
    """The Triton signature type a launch argument gets (tensors become typed pointers)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return "*" + _TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) > 2**31 - 1 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def all_launches() -> list:
    launches = []
    for family_launches in FAMILY_LAUNCHES:
        launches.extend(family_launches())
    return launches


def meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = True
                ) -> torch.Tensor:
    """A shape-and-stride-only tensor for building launches that are compiled, not run."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


# ----------------------------------------------------------------------------- the shapes
# One builder per kernel family: the Launch records its host module builds for every config
# in its tables, each on a representative layer (channels_last activations, meta tensors).


# ----- pools

def _pool_runs() -> list[tuple[torch.dtype, TileConfig]]:
    """Every NHWC tile in bf16, and the widest in fp32: fp32 differs from bf16 only in
    vector width, which the widest tile shows."""
    return [(torch.bfloat16, tile) for tile in NHWC_TILES] + [(torch.float32, NHWC_TILES[-1])]


def max_pool_launches() -> list[Launch]:
    """Max pool forward and backward on AlexNet's overlapping 3x3 stride-2 window (the
    most taps)."""
    geometry = PoolGeometry((3, 3), (2, 2), (0, 0))
    launches = []
    for dtype, tile in _pool_runs():
        x = meta_tensor((128, 64, 55, 55), dtype)
        y = meta_tensor((128, 64, 27, 27), dtype)
        offsets = meta_tensor((128, 64, 27, 27), torch.int8)
        launches += [max_pool.forward_launch(x, y, offsets, None, geometry, tile),
                     max_pool.backward_launch(y, offsets, x, geometry, tile)]
    return launches


def avg_pool_launches() -> list[Launch]:
    """Average pool forward and backward on LeNet's 2x2 window, adaptive average pool
    forward and backward on AlexNet's 13x13 -> 6x6."""
    geometry = PoolGeometry((2, 2), (2, 2), (0, 0))
    launches = []
    for dtype, tile in _pool_runs():
        x = meta_tensor((1024, 16, 10, 10), dtype)
        y = meta_tensor((1024, 16, 5, 5), dtype)
        features = meta_tensor((256, 256, 13, 13), dtype)
        pooled = meta_tensor((256, 256, 6, 6), dtype)
        launches += [avg_pool.avg_forward_launch(x, y, geometry, True, None, tile),
                     avg_pool.avg_backward_launch(y, x, geometry, False, None, tile),
                     avg_pool.adaptive_forward_launch(features, pooled, tile),
                     avg_pool.adaptive_backward_launch(pooled, features, tile)]
    return launches


# ----- conv2d

# The layer each forward tile is meant for (batch 64): C, K_out, size, kernel, pad.
_CONV_FORWARD_LAYERS = {
    "flat_n16": (1, 6, 32, 5, 0),         # LeNet conv1
    "flat_n64": (3, 64, 224, 3, 1),       # VGG conv1_1
    "chan_n64": (64, 64, 224, 3, 1),      # VGG conv1_2
    "chan_n128": (256, 256, 56, 3, 1),    # VGG conv3_3
    "fp32": (256, 256, 56, 3, 1),         # fp32 without TF32: VGG conv3_3
}
_CONV_OPERANDS = ((Operand.SIXTEEN_BIT, torch.bfloat16), (Operand.TF32, torch.float32),
                  (Operand.IEEE, torch.float32))


def conv2d_launches() -> list[Launch]:
    """Every forward tile on its layer with the bias epilogue; the 16-bit tiles, where
    register pressure is highest, also with the training (bias + stats) and eval (bias +
    scale/shift + ReLU) epilogues; one fp16 launch (bf16's twin); then dgrad and wgrad."""
    launches = []
    for name, tile in conv_ops.CONV_FORWARD.items():
        layer, operand = name.rsplit("_", 1)
        operand = Operand(operand)
        dtypes = [torch.float32] if operand is not Operand.SIXTEEN_BIT else (
            [torch.bfloat16, torch.float16] if name == "chan_n128_16bit" else [torch.bfloat16])
        for dtype in dtypes:
            C, K_out, size, k, pad = _CONV_FORWARD_LAYERS[layer]
            geometry = ConvGeometry((k, k), padding=(pad, pad))
            x = meta_tensor((64, C, size, size), dtype)
            y = meta_tensor((64, K_out, *geometry.output_size(size, size)), dtype)
            weight_rsc, bias = _matrix(K_out, k, k, C, dtype=dtype), _matrix(K_out, dtype=dtype)
            per_channel = _matrix(K_out, dtype=torch.float32)
            stats = _matrix(3, triton.cdiv(y.numel() // K_out, tile.block_m), K_out,
                            dtype=torch.float32)
            epilogues = [(None, None, False)]
            if dtype == torch.bfloat16:
                epilogues += [(stats, None, False), (None, per_channel, True)]
            launches += [conv2d.forward_launch(x, weight_rsc, bias, scale, scale, relu, y,
                                               partials, geometry, operand, tile)
                         for partials, scale, relu in epilogues]
    return launches + _conv2d_dgrad_launches() + _conv2d_wgrad_launches()


def _conv2d_dgrad_launches() -> list[Launch]:
    """Every dgrad tile, each on a layer that picks it, plus AlexNet conv1 for a 16-phase
    stride-4 grid; one launch per (tile, stride)."""
    layers = (  # (N, C, H, W, K_out, geometry)
        (1024, 6, 14, 14, 16, ConvGeometry((5, 5))),                        # LeNet conv2
        (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv1_2
        (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv3_3
        (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),     # AlexNet conv1
    )
    launches = {}
    for operand, dtype in _CONV_OPERANDS:
        for N, C, H, W, K_out, geometry in layers:
            tile = conv_ops.dgrad_tile(C, K_out, operand,
                                       conv2d_backward.phase_pixels(N, H, W, geometry),
                                       interpreter=False)
            launch = conv2d_backward.dgrad_launch(
                meta_tensor((N, K_out, *geometry.output_size(H, W)), dtype),
                conv_ops.dgrad_weight(meta_tensor((K_out, C, *geometry.kernel), dtype)),
                meta_tensor((N, C, H, W), dtype), geometry, operand, tile)
            name = f"{launch.name[:-1]},s{geometry.stride[0]}]"
            launches.setdefault(name, dataclasses.replace(launch, name=name))
    return list(launches.values())


def _conv2d_wgrad_launches() -> list[Launch]:
    """Every wgrad tile, each on a layer that picks it, with its path (tap-aligned or flat)
    and the split-K merge it brings."""
    layers = (  # (N, C, H, W, K_out, geometry)
        (1024, 1, 32, 32, 6, ConvGeometry((5, 5))),                         # LeNet conv1
        (64, 3, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),        # VGG conv1_1
        (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),     # AlexNet conv1
        (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv1_2
        (128, 64, 27, 27, 192, ConvGeometry((5, 5), padding=(2, 2))),       # AlexNet conv2
        (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv3_3
    )
    launches = {}
    for operand, dtype in _CONV_OPERANDS:
        for N, C, H, W, K_out, geometry in layers:
            x = meta_tensor((N, C, H, W), dtype)
            dy = meta_tensor((N, K_out, *geometry.output_size(H, W)), dtype)
            plan, _, _ = conv_ops.wgrad_plan(x, dy, torch.Size((K_out, C, *geometry.kernel)),
                                             True, geometry, operand, interpreter=False)
            main = plan[0]
            path = "tap" if main.constexprs["TAP_ALIGNED"] else "flat"
            name = f"{main.name[:-1]},{path}]"
            launches.setdefault(name, dataclasses.replace(main, name=name))
            launches.setdefault(plan[1].name, plan[1])
    return list(launches.values())


# ----- batch norm

def _batch_norm_tile_launches(dtype: torch.dtype, tile: TileConfig) -> list[Launch]:
    """The per-pixel kernels of one NHWC tile on a VGG-like 64 x C x 56 x 56 activation (C
    the tile's width, 256 for the widest): statistics, normalise, BatchNorm fused into a 2x2
    max pool and a 3x3 average pool, backward sums and dx (training and eval)."""
    C = 256 if tile is NHWC_TILES[-1] else tile.block_n
    pixels = 64 * 56 * 56
    x, pooled = meta_tensor((64, C, 56, 56), dtype), meta_tensor((64, C, 28, 28), dtype)
    stats = BatchNormStatistics(*(_matrix(C, dtype=torch.float32) for _ in range(4)))
    steps = batch_norm_ops.gpu_tile_steps(pixels, C, tile)
    tiles = triton.cdiv(pixels, steps * tile.block_m)
    normalization = batch_norm_ops.pool_normalization(stats)
    return [
        batch_norm.partials_launch(x, _matrix(3, tiles, C, dtype=torch.float32), steps, tile),
        batch_norm.apply_launch(x, x, stats, True, tile),
        max_pool.forward_launch(x, pooled, meta_tensor((64, C, 28, 28), torch.int8), None,
                                PoolGeometry((2, 2), (2, 2), (0, 0)), tile, normalization, True),
        avg_pool.avg_forward_launch(x, pooled, PoolGeometry((3, 3), (2, 2), (1, 1)), True, None,
                                    tile, normalization, True),
        batch_norm.backward_partials_launch(x, x, stats, True,
                                            _matrix(2, tiles, C, dtype=torch.float32), steps,
                                            tile),
        batch_norm.backward_input_launch(x, x, x, stats, BackwardSums(stats.mean, stats.mean),
                                         True, tile),
        batch_norm.backward_input_launch(x, x, x, stats, None, False, tile),
    ]


def batch_norm_launches() -> list[Launch]:
    """The per-pixel kernels on every NHWC tile (``_pool_runs``), then the merges of 512
    tiles of partials of 256 channels: finalize (training and eval) and backward sums."""
    launches = [launch for dtype, tile in _pool_runs()
                for launch in _batch_norm_tile_launches(dtype, tile)]
    C = 256
    stats = BatchNormStatistics(*(_matrix(C, dtype=torch.float32) for _ in range(4)))
    running = _matrix(C, dtype=torch.float32)
    merge = batch_norm_ops.MERGE_TILE
    return launches + [
        batch_norm.finalize_launch(tuple(_matrix(3, 512, C, dtype=torch.float32)), running,
                                   running, running, running, stats, 0.1, 1e-5, merge),
        batch_norm.finalize_launch(None, running, running, running, running, stats, 0.0, 1e-5,
                                   merge),
        batch_norm.backward_reduce_launch(_matrix(2, 512, C, dtype=torch.float32),
                                          BackwardSums(running, running), running, running,
                                          merge),
    ]


# ----- linear, dropout, relu

# The classifier layers the linear tiles are meant for: name -> (batch, in, out features).
LINEAR_LAYERS: dict[str, tuple[int, int, int]] = {
    "alexnet_fc6_b64": (64, 9216, 4096),
    "alexnet_fc6_b256": (256, 9216, 4096),
    "fc7_b64": (64, 4096, 4096),
    "fc7_b256": (256, 4096, 4096),
    "fc8_b64": (64, 4096, 1000),
    "fc8_b256": (256, 4096, 1000),
    "lenet_fc1_b1024": (1024, 400, 120),
    "lenet_fc2_b1024": (1024, 120, 84),
    "lenet_fc3_b1024": (1024, 84, 10),
}

# (layer, dtype, operand) compiled: every classifier layer in bf16; TF32 on the layers that
# reach each TF32 tile; fp16 and fp32 without TF32 on one layer.
_LINEAR_RUNS = (
    *((layer, torch.bfloat16, Operand.SIXTEEN_BIT) for layer in LINEAR_LAYERS),
    ("alexnet_fc6_b64", torch.float32, Operand.TF32),
    ("alexnet_fc6_b256", torch.float32, Operand.TF32),
    ("lenet_fc1_b1024", torch.float32, Operand.TF32),
    ("lenet_fc3_b1024", torch.float32, Operand.TF32),
    ("alexnet_fc6_b256", torch.float16, Operand.SIXTEEN_BIT),
    ("alexnet_fc6_b256", torch.float32, Operand.IEEE),
)


def _matrix(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return meta_tensor(shape, dtype, channels_last=False)


def _linear_step(batch: int, in_features: int, out_features: int, dtype: torch.dtype,
                 operand: Operand) -> list[Launch]:
    """What one training step of a Linear -> ReLU -> Dropout layer launches."""
    x, weight = _matrix(batch, in_features, dtype=dtype), _matrix(out_features, in_features,
                                                                  dtype=dtype)
    bias, y = _matrix(out_features, dtype=dtype), _matrix(batch, out_features, dtype=dtype)
    seed = _matrix(1, dtype=torch.int64)
    row_tile = linear_ops.ROW_TILE
    bias_partial = _matrix(triton.cdiv(batch, row_tile.block_m), out_features,
                           dtype=torch.float32)
    return [*linear_ops.gemm_plan(x, weight.t(), y, bias, seed, True, 0.5, operand, "forward"),
            linear.output_grad_launch(y, y, seed, y, bias_partial, True, 0.5, row_tile),
            linear.sum_rows_launch(bias_partial, bias, row_tile),
            *linear_ops.gemm_plan(y, weight, x, None, None, False, 0.0, operand, "input_grad"),
            *linear_ops.gemm_plan(y.t(), x, weight, None, None, False, 0.0, operand,
                                  "weight_grad")]


def linear_launches() -> list[Launch]:
    """The GEMMs of a training step (Linear -> ReLU -> Dropout) of the layers in
    ``_LINEAR_RUNS`` and its elementwise kernels in bf16, the plain-Linear, dropout-only and
    eval-mode epilogues, and the standalone dropout; each distinct compilation once."""
    launches = []
    for layer, dtype, operand in _LINEAR_RUNS:
        step = _linear_step(*LINEAR_LAYERS[layer], dtype, operand)
        # The elementwise kernels hold at most 16 elements a thread: bf16 shows them.
        launches += [launch for launch in step
                     if dtype == torch.bfloat16 or launch.kernel is linear.linear_gemm_kernel]
    x, weight, y = _matrix(256, 9216), _matrix(4096, 9216), _matrix(256, 4096)
    seed = _matrix(1, dtype=torch.int64)
    sixteen_bit = Operand.SIXTEEN_BIT
    launches += linear_ops.gemm_plan(x, weight.t(), y, None, None, False, 0.0, sixteen_bit,
                                     "forward")
    launches += linear_ops.gemm_plan(x, weight.t(), y, None, seed, False, 0.5, sixteen_bit,
                                     "forward")
    # Eval mode (bias + ReLU, no dropout) at a batch large enough for no split: n128 tiles.
    eval_batch = _matrix(1024, 4096)
    launches += linear_ops.gemm_plan(eval_batch, _matrix(4096, 4096).t(), eval_batch,
                                     _matrix(4096), None, True, 0.0, sixteen_bit, "forward")
    launches.append(linear.output_grad_launch(y, None, seed, y, None, False, 0.5,
                                              linear_ops.ROW_TILE))
    launches.append(dropout.dropout_launch(x, x, seed, 0.5, dropout_ops.DROPOUT_TILE))
    distinct: dict[tuple, Launch] = {}
    for launch in launches:
        distinct.setdefault(_linear_compile_key(launch), launch)
    return list(distinct.values())


def _linear_compile_key(launch: Launch) -> tuple:
    """What a compilation depends on besides the kernel and constexprs (in the name): the
    tensors' dtypes and, for the GEMM (the one near the register limit), the integers the JIT
    specializes (equal to 1, divisible by 16)."""
    def kind(value):
        if hasattr(value, "dtype"):
            return str(value.dtype)
        if isinstance(value, int) and not isinstance(value, bool) \
                and launch.kernel is linear.linear_gemm_kernel:
            return value == 1, value % 16 == 0
        return type(value).__name__
    return launch.name, tuple(kind(value) for value in launch.args.values())


def relu_launches() -> list[Launch]:
    """ReLU forward and backward on a VGG activation, in bf16 and fp32."""
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        x = meta_tensor((64, 256, 56, 56), dtype)
        launches += [relu.forward_launch(x, x, relu_ops.RELU_TILE),
                     relu.backward_launch(x, x, x, relu_ops.RELU_TILE)]
    return launches


# Every family's builder, in the report's order.
FAMILY_LAUNCHES: tuple = (max_pool_launches, avg_pool_launches, conv2d_launches, linear_launches,
                          relu_launches, batch_norm_launches)


def specialize(launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """Signature, constexprs and attributes as Triton's JIT would specialize this launch:
    integers equal to 1 become constants, and pointers (torch allocations are 16-byte
    aligned) and integers divisible by 16 get the divisibility hint that enables vectors."""
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for position, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
            continue
        signature[name] = triton_type(value)
        if hasattr(value, "shape") or (isinstance(value, int) and not isinstance(value, bool)
                                       and value % 16 == 0):
            attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_launch(launch) -> dict[str, Any]:
    """Compile one Launch for sm_90a and read its resource usage and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})
    resources, sass = _cuobjdump(compiled.asm["cubin"])
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", resources)
    return {
        "name": launch.name,
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
        "registers": int(usage.group(1)),
        "stack_bytes": int(usage.group(2)),
        "shared_bytes": compiled.metadata.shared,
        "spill_loads": len(re.findall(r"\bLDL\b", sass)),
        "spill_stores": len(re.findall(r"\bSTL\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


def _cuobjdump(cubin: bytes) -> tuple[str, str]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        resources = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                                   text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    return resources, sass


def _compile_index(index: int) -> dict[str, Any]:
    return compile_launch(all_launches()[index])


def compile_all(workers: int | None = None) -> list[dict[str, Any]]:
    count = len(all_launches())
    workers = workers or min(os.cpu_count() or 1, 8)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile_index, range(count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel config")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    reports = compile_all()
    if args.json:
        for report in reports:
            print(json.dumps(report))
        return 0
    columns = ("name", "num_warps", "num_stages", "registers", "stack_bytes", "shared_bytes",
               "spill_loads", "spill_stores", "hgmma", "hmma")
    widths = [max(len(c), *(len(str(r[c])) for r in reports)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for report in reports:
        print("  ".join(str(report[c]).ljust(w) for c, w in zip(columns, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
