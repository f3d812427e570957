"""The memory-bound families' report cases: max and average pooling, BatchNorm (statistics,
normalise, fused into a pool, backward) and ReLU, on NHWC activations of representative
layers. The tuned kernels (every one but BatchNorm's reductions) also on their candidates."""
from __future__ import annotations

import torch
import triton

from fastarch.compile_report.cases import (Case, TileChoice, cases, matrix,
                                           meta_tensor)
from fastarch.kernels import avg_pool, batch_norm, max_pool, relu
from fastarch.kernels.batch_norm import BackwardSums, BatchNormStatistics
from fastarch.kernels.launch import Launch, TileConfig
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.ops import batch_norm as batch_norm_ops
from fastarch.ops import relu as relu_ops
from fastarch.ops.common import NHWC_TILES


def nhwc_runs() -> list[tuple[torch.dtype, TileConfig]]:
    """Every NHWC tile in bf16, and the widest in fp32: fp32 differs from bf16 only in
    vector width, which the widest tile shows."""
    return [(torch.bfloat16, tile) for tile in NHWC_TILES] + [(torch.float32, NHWC_TILES[-1])]


def max_pool_cases(choice: TileChoice) -> list[Case]:
    """Max pool forward and backward on AlexNet's overlapping 3x3 stride-2 window (the
    most taps)."""
    geometry = PoolGeometry((3, 3), (2, 2), (0, 0))
    found = []
    for dtype, static in nhwc_runs():
        x = meta_tensor((128, 64, 55, 55), dtype)
        y = meta_tensor((128, 64, 27, 27), dtype)
        offsets = meta_tensor((128, 64, 27, 27), torch.int8)
        for tile in choice.elementwise_tiles(static, dtype):
            found += cases(dtype, [max_pool.forward_launch(x, y, offsets, None, geometry, tile),
                                   max_pool.backward_launch(y, offsets, x, geometry, tile)],
                           tile is not static)
    return found


def avg_pool_cases(choice: TileChoice) -> list[Case]:
    """Average pool forward and backward on LeNet's 2x2 window, adaptive average pool
    forward and backward on AlexNet's 13x13 -> 6x6."""
    geometry = PoolGeometry((2, 2), (2, 2), (0, 0))
    found = []
    for dtype, static in nhwc_runs():
        x = meta_tensor((1024, 16, 10, 10), dtype)
        y = meta_tensor((1024, 16, 5, 5), dtype)
        features = meta_tensor((256, 256, 13, 13), dtype)
        pooled = meta_tensor((256, 256, 6, 6), dtype)
        for tile in choice.elementwise_tiles(static, dtype):
            found += cases(dtype, [
                avg_pool.avg_forward_launch(x, y, geometry, True, None, tile),
                avg_pool.avg_backward_launch(y, x, geometry, False, None, tile),
                avg_pool.adaptive_forward_launch(features, pooled, tile),
                avg_pool.adaptive_backward_launch(pooled, features, tile)], tile is not static)
    return found


def _batch_norm_statistics(x: torch.Tensor, stats: BatchNormStatistics, tile: TileConfig
                           ) -> list[Launch]:
    """The reductions over pixels (untuned): the statistics' partials and the backward's
    sums' partials."""
    pixels, C = x.numel() // x.shape[1], x.shape[1]
    steps = batch_norm_ops.gpu_tile_steps(pixels, C, tile)
    tiles = triton.cdiv(pixels, steps * tile.block_m)
    return [batch_norm.partials_launch(x, matrix(3, tiles, C, dtype=torch.float32), steps, tile),
            batch_norm.backward_partials_launch(x, x, stats, True,
                                                matrix(2, tiles, C, dtype=torch.float32),
                                                steps, tile)]


def _batch_norm_per_pixel(x: torch.Tensor, stats: BatchNormStatistics, tile: TileConfig
                          ) -> list[Launch]:
    """The tuned per-pixel kernels: normalise, BatchNorm fused into a 2x2 max pool (and
    folded into its backward) and a 3x3 average pool, and dx (training and eval)."""
    N, C, H, W = x.shape
    pooled = meta_tensor((N, C, H // 2, W // 2), x.dtype)
    offsets = meta_tensor(pooled.shape, torch.int8)
    window = PoolGeometry((2, 2), (2, 2), (0, 0))
    normalization = batch_norm_ops.pool_normalization(stats)
    sums = matrix(max_pool.backward_sum_rows(x.shape, tile), 2, C, dtype=torch.float32)
    return [
        batch_norm.apply_launch(x, x, stats, True, tile),
        max_pool.forward_launch(x, pooled, offsets, None, window, tile, normalization, True),
        max_pool.backward_launch(pooled, offsets, x, window, tile,
                                 fold=max_pool.PoolGradFold(x, normalization, True, sums)),
        avg_pool.avg_forward_launch(x, pooled, PoolGeometry((3, 3), (2, 2), (1, 1)), True, None,
                                    tile, normalization, True),
        batch_norm.backward_input_launch(x, x, x, stats, BackwardSums(stats.mean, stats.mean),
                                         True, tile),
        batch_norm.backward_input_launch(x, x, x, stats, None, False, tile),
    ]


def batch_norm_cases(choice: TileChoice) -> list[Case]:
    """The per-pixel kernels of every NHWC tile (``nhwc_runs``) on a VGG-like
    64 x C x 56 x 56 activation (C the tile's width, 256 for the widest), then the merges of
    512 tiles of partials of 256 channels: finalize (training and eval) and backward sums."""
    found = []
    for dtype, static in nhwc_runs():
        C = 256 if static is NHWC_TILES[-1] else static.block_n
        x = meta_tensor((64, C, 56, 56), dtype)
        stats = BatchNormStatistics(*(matrix(C, dtype=torch.float32) for _ in range(4)))
        found += cases(dtype, _batch_norm_statistics(x, stats, static))
        for tile in choice.elementwise_tiles(static, dtype):
            found += cases(dtype, _batch_norm_per_pixel(x, stats, tile), tile is not static)
    C = 256
    stats = BatchNormStatistics(*(matrix(C, dtype=torch.float32) for _ in range(4)))
    running = matrix(C, dtype=torch.float32)
    merge = batch_norm_ops.MERGE_TILE
    return found + cases(torch.float32, [
        batch_norm.finalize_launch(tuple(matrix(3, 512, C, dtype=torch.float32)), running,
                                   running, running, running, stats, 0.1, 1e-5, merge),
        batch_norm.finalize_launch(None, running, running, running, running, stats, 0.0, 1e-5,
                                   merge),
        batch_norm.backward_reduce_launch(matrix(2, 512, C, dtype=torch.float32),
                                          BackwardSums(running, running), running, running,
                                          merge),
    ])


def relu_cases(choice: TileChoice) -> list[Case]:
    """ReLU forward and backward on a VGG activation, in bf16 and fp32."""
    found = []
    for dtype in (torch.bfloat16, torch.float32):
        x = meta_tensor((64, 256, 56, 56), dtype)
        for tile in choice.elementwise_tiles(relu_ops.RELU_TILE, dtype):
            found += cases(dtype, [relu.forward_launch(x, x, tile),
                                   relu.backward_launch(x, x, x, tile)],
                           tile is not relu_ops.RELU_TILE)
    return found
