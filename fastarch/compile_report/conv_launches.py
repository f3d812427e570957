"""The convolution family's report cases: every forward tile with its epilogues, every dgrad
and wgrad tile (with wgrad's split-K merge), each on a layer of LeNet-5, AlexNet or VGG that
picks it."""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import torch

from fastarch.compile_report.cases import Case, TileChoice, matrix, meta_tensor
from fastarch.kernels import conv2d, conv2d_backward, conv2d_tma
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.nhwc import padded_copy_kernel
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import conv2d as conv_ops

# The layer each forward tile is meant for (batch 64): C, K_out, size, kernel, pad.
FORWARD_LAYERS = {
    "flat_n16": (1, 6, 32, 5, 0),         # LeNet conv1
    "flat_n64": (3, 64, 224, 3, 1),       # VGG conv1_1
    "chan_n64": (64, 64, 224, 3, 1),      # VGG conv1_2
    "chan_n128": (256, 256, 56, 3, 1),    # VGG conv3_3
    "fp32": (256, 256, 56, 3, 1),         # fp32 without TF32: VGG conv3_3
}
OPERANDS = ((Operand.SIXTEEN_BIT, torch.bfloat16), (Operand.TF32, torch.float32),
            (Operand.IEEE, torch.float32))

# The layers dgrad's tiles are picked on, (N, C, H, W, K_out, geometry): AlexNet conv1 for a
# 16-phase stride-4 grid.
DGRAD_LAYERS = (
    (1024, 6, 14, 14, 16, ConvGeometry((5, 5))),                        # LeNet conv2
    (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv1_2
    (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv3_3
    (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),     # AlexNet conv1
)

# The layers the TMA dgrad is compiled on (Hopper): VGG conv3_3 with every TMA tile, one
# launch; a 1x1 stride-2 layer (no layer of these networks: ResNet's downsampling shortcut)
# on the static tile, for its four phases: one launch of a 1x1 kernel and three zero fills.
TMA_DGRAD_LAYERS = (
    (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv3_3
    (64, 256, 56, 56, 512, ConvGeometry((1, 1), (2, 2))),               # 1x1 stride 2
)

# The layers wgrad's tiles are picked on: both paths (tap-aligned and flat), and split-K.
WGRAD_LAYERS = (
    (1024, 1, 32, 32, 6, ConvGeometry((5, 5))),                         # LeNet conv1
    (64, 3, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),        # VGG conv1_1
    (128, 3, 227, 227, 64, ConvGeometry((11, 11), (4, 4), (2, 2))),     # AlexNet conv1
    (64, 64, 224, 224, 64, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv1_2
    (128, 64, 27, 27, 192, ConvGeometry((5, 5), padding=(2, 2))),       # AlexNet conv2
    (64, 256, 56, 56, 256, ConvGeometry((3, 3), padding=(1, 1))),       # VGG conv3_3
)


def conv2d_cases(choice: TileChoice) -> list[Case]:
    """Every forward tile on its layer (on Hopper also the TMA forward's), then dgrad (on
    Hopper also the TMA dgrad's) and wgrad."""
    tma = _tma_forward_cases() if choice.hopper else []
    tma_dgrad = _tma_dgrad_cases() if choice.hopper else []
    tma_wgrad = _tma_wgrad_cases() if choice.hopper else []
    return (_forward_cases(choice) + tma + _dgrad_cases(choice) + tma_dgrad
            + _wgrad_cases(choice) + tma_wgrad + _prologue_cases(choice.hopper)
            + _residual_cases(choice.hopper))


def _forward_cases(choice: TileChoice) -> list[Case]:
    """Every forward tile on its layer with its epilogues (``_forward_epilogues``), and one
    fp16 launch (bf16's twin)."""
    found = []
    for name, static in conv_ops.CONV_FORWARD.items():
        layer, operand = name.rsplit("_", 1)
        operand = Operand(operand)
        dtypes = [torch.float32] if operand is not Operand.SIXTEEN_BIT else (
            [torch.bfloat16, torch.float16] if name == "chan_n128_16bit" else [torch.bfloat16])
        C, K_out, size, k, pad = FORWARD_LAYERS[layer]
        geometry = ConvGeometry((k, k), padding=(pad, pad))
        P, Q = geometry.output_size(size, size)
        for dtype in dtypes:
            x, y = meta_tensor((64, C, size, size), dtype), meta_tensor((64, K_out, P, Q), dtype)
            bias = matrix(K_out, dtype=dtype)
            x_in, weight_in, build = x, matrix(K_out, k, k, C, dtype=dtype), conv2d.forward_launch
            if C < conv2d.SMALL_C:  # the row-run loop over x's padded copy, the weight itself
                x_in = matrix(*conv2d.run_copy_shape(x.shape, geometry, dtype), dtype=dtype)
                weight_in = matrix(K_out, C, k, k, dtype=dtype)
                build = conv2d.row_run_forward_launch
            for stats, scale, relu in _forward_epilogues(dtype, K_out):
                candidates = partial(conv_ops.forward_candidates, static, K_out, 64 * P * Q,
                                     stats)
                for tile in choice.tiles(static, dtype, candidates):
                    partials = (matrix(3, conv_ops.forward_m_tiles(tile, 64, P, Q), K_out,
                                       dtype=torch.float32) if stats else None)
                    found.append(Case(build(
                        x_in, weight_in, bias, scale, scale, relu, y, partials, geometry,
                        operand, tile), dtype, tile is not static))
    return found


Epilogue = tuple[bool, Optional[torch.Tensor], bool]  # stats, scale (and shift), ReLU


def _forward_epilogues(dtype: torch.dtype, K_out: int) -> list[Epilogue]:
    """The forward's epilogues compiled (beside the bias): none; in bf16, where
    register pressure is highest, also training (bias + stats) and eval (bias + scale/shift
    + ReLU)."""
    per_channel = matrix(K_out, dtype=torch.float32)
    if dtype != torch.bfloat16:
        return [(False, None, False)]
    return [(False, None, False), (True, None, False), (False, per_channel, True)]


def _tma_forward_cases() -> list[Case]:
    """Every tile of the TMA forward (Hopper: ``FASTARCH_CONV_ALGO=tma``'s static tiles and
    the autotuner's candidates) at its depth on VGG conv3_3, whose C every depth divides."""
    C, K_out, size, k, pad = FORWARD_LAYERS["chan_n128"]
    geometry = ConvGeometry((k, k), padding=(pad, pad))
    P, Q = geometry.output_size(size, size)
    found = []
    for operand, dtype in OPERANDS[:2]:  # tensor-core operands only
        x, y = meta_tensor((64, C, size, size), dtype), meta_tensor((64, K_out, P, Q), dtype)
        weight_rsc, bias = matrix(K_out, k, k, C, dtype=dtype), matrix(K_out, dtype=dtype)
        for base in conv_ops.TMA_FORWARD.values():
            tile = conv_ops.tma_tile(base, C, operand)
            for stats, scale, relu in _forward_epilogues(dtype, K_out):
                if stats and not conv_ops.tma_takes_heavy_epilogue(tile):
                    continue  # never chosen with STATS
                partials = (matrix(3, conv_ops.forward_m_tiles(tile, 64, P, Q), K_out,
                                   dtype=torch.float32) if stats else None)
                found.append(Case(conv2d_tma.tma_forward_launch(
                    x, weight_rsc, bias, scale, scale, relu, y, partials, geometry, operand,
                    tile), dtype))
    return found


def _residual_cases(hopper: bool) -> list[Case]:
    """A residual block's end in eval, in bf16 on VGG conv3_3: the folded BatchNorm's
    scale/shift, the identity added (channels_last, as y) and the ReLU, on the pointer
    forward's chan_n128 tile and on Hopper on the TMA tiles that may take it
    (``tma_takes_heavy_epilogue``)."""
    C, K_out, size, k, pad = FORWARD_LAYERS["chan_n128"]
    geometry = ConvGeometry((k, k), padding=(pad, pad))
    operand, dtype = OPERANDS[0]
    x, y = meta_tensor((64, C, size, size), dtype), meta_tensor((64, K_out, size, size), dtype)
    residual = meta_tensor(y.shape, dtype)
    weight_rsc, per_channel = matrix(K_out, k, k, C, dtype=dtype), matrix(K_out,
                                                                          dtype=torch.float32)
    tma_tiles = [conv_ops.tma_tile(base, C, operand) for base in conv_ops.TMA_FORWARD.values()]
    tiles = [conv_ops.CONV_FORWARD["chan_n128_16bit"]] + (
        [tile for tile in tma_tiles if conv_ops.tma_takes_heavy_epilogue(tile)]
        if hopper else [])
    return [Case((conv2d_tma.tma_forward_launch if tile.tma else conv2d.forward_launch)(
        x, weight_rsc, None, per_channel, per_channel, True, y, None, geometry, operand, tile,
        residual=residual), dtype) for tile in tiles]


def _prologue_cases(hopper: bool) -> list[Case]:
    """The input prologue (with its ReLU) in bf16 on VGG conv3_3, where a following
    BatchNorm's normalization is folded into the next conv: the pointer forward's chan_n128
    tile (bias) and the pointer wgrad's static tile; on Hopper also the TMA forward's
    m128_n128 and m128_n256 tiles and the TMA wgrad's m128_n128 (its register operand must
    keep wgmma asynchronous)."""
    C, K_out, size, k, pad = FORWARD_LAYERS["chan_n128"]
    geometry = ConvGeometry((k, k), padding=(pad, pad))
    operand, dtype = OPERANDS[0]
    x, y = meta_tensor((64, C, size, size), dtype), meta_tensor((64, K_out, size, size), dtype)
    weight_rsc, bias = matrix(K_out, k, k, C, dtype=dtype), matrix(K_out, dtype=dtype)
    per_channel = matrix(C, dtype=torch.float32)
    prologue = conv2d.InputNormalization(per_channel, per_channel, True)
    weight_shape = torch.Size((K_out, C, k, k))
    wgrad_tile = conv_ops.wgrad_tile(C, K_out, operand, k * k, 64 * size * size,
                                     interpreter=False)
    launches = [
        conv2d.forward_launch(x, weight_rsc, bias, None, None, False, y, None, geometry,
                              operand, conv_ops.CONV_FORWARD["chan_n128_16bit"],
                              prologue=prologue),
        conv_ops.wgrad_launches(x, y, weight_shape, True, geometry, operand, wgrad_tile,
                                interpreter=False, prologue=prologue)[0][0]]
    if hopper:
        for name in ("tma_m128_n128", "tma_m128_n256"):
            tile = conv_ops.tma_tile(conv_ops.TMA_FORWARD[name], C, operand)
            launches.append(conv2d_tma.tma_forward_launch(
                x, weight_rsc, bias, None, None, False, y, None, geometry, operand, tile,
                prologue=prologue))
        tile = conv_ops.tma_wgrad_fit(conv_ops.TMA_WGRAD["tma_wgrad_m128_n128"], C, size,
                                      operand)
        launches.append(conv_ops.wgrad_launches(x, y, weight_shape, True, geometry, operand,
                                                tile, interpreter=False,
                                                prologue=prologue)[0][0])
    return [Case(launch, dtype) for launch in launches]


def _dgrad_cases(choice: TileChoice) -> list[Case]:
    """Every dgrad tile, each on a layer that picks it; one launch per (tile, stride)."""
    found: dict[str, Case] = {}
    for operand, dtype in OPERANDS:
        for N, C, H, W, K_out, geometry in DGRAD_LAYERS:
            pixels = conv2d_backward.phase_pixels(N, H, W, geometry)
            static = conv_ops.dgrad_tile(C, K_out, operand, pixels, interpreter=False)
            dy = meta_tensor((N, K_out, *geometry.output_size(H, W)), dtype)
            weight = conv_ops.dgrad_weight(meta_tensor((K_out, C, *geometry.kernel), dtype))
            dx = meta_tensor((N, C, H, W), dtype)
            candidates = partial(conv_ops.dgrad_candidates, static, C, pixels)
            for tile in choice.tiles(static, dtype, candidates):
                launch = conv2d_backward.dgrad_launch(dy, weight, dx, geometry, operand, tile)
                name = f"{launch.name[:-1]},s{geometry.stride[0]}]"
                found.setdefault(name, Case(dataclasses.replace(launch, name=name), dtype,
                                            tile is not static))
    return list(found.values())


def _tma_dgrad_cases() -> list[Case]:
    """The TMA dgrad (Hopper) on ``TMA_DGRAD_LAYERS``: every TMA tile at its depth on the
    stride-1 layer, the static tile on the stride-2 one; one case per distinct launch."""
    found: dict[str, Case] = {}
    for operand, dtype in OPERANDS[:2]:  # tensor-core operands only
        for index, (N, C, H, W, K_out, geometry) in enumerate(TMA_DGRAD_LAYERS):
            phase_width = -(-W // geometry.stride[1])
            static = conv_ops.tma_dgrad_tile(C, K_out, phase_width, operand, interpreter=False)
            tiles = [conv_ops.tma_tile(base, K_out, operand)
                     for base in conv_ops.TMA_FORWARD.values()] if index == 0 else [static]
            dy = meta_tensor((N, K_out, *geometry.output_size(H, W)), dtype)
            weight = matrix(K_out, C, *geometry.kernel, dtype=dtype)
            dx = meta_tensor((N, C, H, W), dtype)
            for tile in tiles:
                for launch in conv2d_tma.tma_dgrad_launches(dy, weight, dx, geometry, operand,
                                                            tile):
                    window = (f",{launch.constexprs['R']}x{launch.constexprs['S']}"
                              if "R" in launch.constexprs else "")
                    name = f"{launch.name[:-1]}{window}]"
                    found.setdefault(name, Case(dataclasses.replace(launch, name=name), dtype,
                                                tile.name != static.name))
    return list(found.values())


def _wgrad_cases(choice: TileChoice) -> list[Case]:
    """Every wgrad tile, each on a layer that picks it, with its path (tap-aligned or flat)
    and the split-K merge it brings."""
    found: dict[str, Case] = {}
    for operand, dtype in OPERANDS:
        for N, C, H, W, K_out, geometry in WGRAD_LAYERS:
            x = meta_tensor((N, C, H, W), dtype)
            dy = meta_tensor((N, K_out, *geometry.output_size(H, W)), dtype)
            weight_shape = torch.Size((K_out, C, *geometry.kernel))
            taps, pixels = geometry.kernel[0] * geometry.kernel[1], dy.numel() // K_out
            static = conv_ops.wgrad_tile(C, K_out, operand, taps, pixels, interpreter=False)
            candidates = partial(conv_ops.wgrad_candidates, static, C, K_out, taps)
            for tile in choice.tiles(static, dtype, candidates):
                launches = conv_ops.wgrad_launches(x, dy, weight_shape, True, geometry,
                                                   operand, tile, interpreter=False)[0]
                # A first layer's (C < SMALL_C) begins with the padded copy of x.
                copies = [launch for launch in launches if launch.kernel is padded_copy_kernel]
                main, *merges = launches[len(copies):]
                path = ("tap" if main.constexprs["TAP_ALIGNED"] else
                        "row" if main.constexprs["ROW_RUN"] else "flat")
                name = f"{main.name[:-1]},{path}]"
                found.setdefault(name, Case(dataclasses.replace(main, name=name), dtype,
                                            tile is not static))
                for merge in merges:
                    found.setdefault(f"{merge.name}:{dtype}", Case(merge, dtype))
    return list(found.values())


def _tma_wgrad_cases() -> list[Case]:
    """Every tile of the TMA wgrad (Hopper: ``FASTARCH_CONV_ALGO=tma``'s static tiles and the
    autotuner's candidates) on VGG conv3_3, its split-K main launch (the merges are the
    pointer wgrad's)."""
    N, C, H, W, K_out, geometry = WGRAD_LAYERS[-1]
    P, Q = geometry.output_size(H, W)
    weight_shape = torch.Size((K_out, C, *geometry.kernel))
    found = []
    for operand, dtype in OPERANDS[:2]:  # tensor-core operands only
        x, dy = meta_tensor((N, C, H, W), dtype), meta_tensor((N, K_out, P, Q), dtype)
        for base in conv_ops.TMA_WGRAD.values():
            tile = conv_ops.tma_wgrad_fit(base, C, Q, operand)
            main = conv_ops.wgrad_launches(x, dy, weight_shape, True, geometry, operand, tile,
                                           interpreter=False)[0][0]
            found.append(Case(main, dtype))
    return found
