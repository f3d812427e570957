"""The TMA conv weight gradient (``kernels.conv2d_tma_wgrad``) against float64 torch autograd,
forced with FASTARCH_CONV_ALGO=tma (the interpreter runs the tensor-descriptor loads and
their zero fill): dW and db through split-K and the merge, and with one split directly; the
(n, p, q) step counters across several steps a row, images and split starts; the layers it
does not take keep the pointer kernel."""
import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import autotune
from fastarch.autotune import Generation
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.conv2d_tma_wgrad import tma_wgrad_launch, tma_wgrad_supported
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import conv2d as conv_ops
from fastarch.testing import assert_close, cudnn_tf32, random_input

# torch's own reference warns that padding='same' with an even kernel pads a copy.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# dtype id -> (dtype, tolerance key)
DTYPES = {"tf32": (torch.float32, "tf32"), "fp16": (torch.float16, torch.float16),
          "bf16": (torch.bfloat16, torch.bfloat16)}

# name -> (input shape, out channels, kernel, F.conv2d keyword arguments, dtype id, splits).
# Tiny: the interpreter pays per program and step. C is a multiple of 16 and K_out a row of
# a multiple of 16 bytes (the TMA wgrad's); the interpreter splits into min(3, N*P) parts.
CASES = {
    "3x3_p1_batch2": ((2, 16, 3, 5), 24, (3, 3), dict(padding=1), "bf16", 3),
    "5x5_p2": ((1, 16, 3, 4), 8, (5, 5), dict(padding=2), "fp16", 3),
    "3x3_dilation2": ((1, 16, 4, 4), 16, (3, 3), dict(padding=2, dilation=2), "tf32", 2),
    "3x3_three_channel_tiles": ((1, 48, 2, 3), 8, (3, 3), dict(padding=1), "tf32", 2),
    "1x1_one_split": ((1, 32, 1, 5), 16, (1, 1), {}, "bf16", 1),
    "3x3_p0_one_row_one_split": ((1, 16, 3, 6), 16, (3, 3), {}, "fp16", 1),
    "same_even_kernel": ((1, 16, 3, 5), 16, (2, 4), dict(padding="same"), "bf16", 3),
}


@pytest.fixture
def tma_wgrads(monkeypatch) -> list:
    """FASTARCH_CONV_ALGO=tma, and the TMA wgrad launches built."""
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    built = []

    def spy(*args, **kwargs):
        built.append(tma_wgrad_launch(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(conv_ops, "tma_wgrad_launch", spy)
    return built


def _autograd(x, weight, bias, dy, kwargs, tf32: bool):
    """dW and db of fastarch's conv2d (x needs no gradient: no dgrad) and float64 torch's."""
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    with cudnn_tf32(tf32):
        fastarch.functional.conv2d(x, weight, bias, **kwargs).backward(dy)
    weight64 = weight.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    F.conv2d(x.double(), weight64, bias64, **kwargs).backward(dy.double())
    return (weight.grad, bias.grad), (weight64.grad, bias64.grad)


@pytest.mark.parametrize("case_id", CASES)
def test_tma_wgrad_matches_float64(case_id, tma_wgrads, device):
    shape, k_out, kernel, kwargs, dtype_id, splits = CASES[case_id]
    dtype, tolerance = DTYPES[dtype_id]
    x = random_input(shape, dtype, device, channels_last=True)
    weight = random_input((k_out, shape[1], *kernel), dtype, device)
    bias = random_input((k_out,), dtype, device)
    out_size = F.conv2d(x.double(), weight.double(), **kwargs).shape
    dy = random_input(out_size, dtype, device, channels_last=True)
    (dw, db), (dw_ref, db_ref) = _autograd(x, weight, bias, dy, kwargs, dtype_id == "tf32")
    assert len(tma_wgrads) == 1
    assert tma_wgrads[0].grid[2] == splits
    pixels = out_size[0] * out_size[2] * out_size[3]
    assert_close(dw, dw_ref, tolerance, pixels, "grad weight")
    assert_close(db, db_ref, tolerance, pixels, "grad bias")


def test_one_split_writes_directly(tma_wgrads, device):
    """One output row: no partial, no merge."""
    x = random_input((1, 32, 1, 5), torch.bfloat16, device, channels_last=True)
    dy = random_input((1, 16, 1, 5), torch.bfloat16, device, channels_last=True)
    plan, _, _ = conv_ops.wgrad_plan(x, dy, torch.Size((16, 32, 1, 1)), True,
                                     ConvGeometry((1, 1)), Operand.SIXTEEN_BIT)
    assert [launch.name.split("[")[0] for launch in plan] == ["conv2d_wgrad_tma"]


def test_steps_wrap_rows_images_and_split_starts(device):
    """Q = 37 in 16-pixel steps (three a row, the last 5 wide), two images of three rows in
    two splits of four rows: split 0 crosses into image 1, split 1 starts mid-image. The
    partials, NaN-filled, are summed here."""
    N, C, H, W, K = 2, 16, 3, 37, 24
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    x = random_input((N, C, H, W), torch.float16, device, channels_last=True)
    dy = random_input((N, K, H, W), torch.float16, device, channels_last=True)
    out = torch.full((2, 3, 3, C, K), float("nan"), device=device)
    bias_out = torch.full((2, K), float("nan"), device=device)
    tile = TileConfig("test", 16, 16, 16, tma=True)
    tma_wgrad_launch(x, dy, out, bias_out, 2, 4, geometry, Operand.SIXTEEN_BIT, tile)()
    dw_ref = torch.nn.grad.conv2d_weight(x.cpu().double(), (K, C, 3, 3), dy.cpu().double(),
                                         padding=1)
    pixels = N * H * W
    assert_close(out.sum(0).permute(3, 2, 0, 1), dw_ref.float(), torch.float32, pixels,
                 "grad weight")
    assert_close(bias_out.sum(0), dy.cpu().double().sum((0, 2, 3)).float(), torch.float32,
                 pixels, "grad bias")


@pytest.mark.parametrize("why, x_shape, dy_shape, geometry, dtype, channels_last", [
    ("stride 2", (1, 16, 6, 6), (1, 16, 3, 3), ConvGeometry((2, 2), (2, 2)), torch.float16,
     True),
    ("NCHW", (1, 16, 4, 4), (1, 16, 4, 4), ConvGeometry((1, 1)), torch.float16, False),
    ("K_out rows of 12 bytes", (1, 16, 4, 4), (1, 6, 4, 4), ConvGeometry((1, 1)),
     torch.float16, True),
    ("C not a multiple of 16", (1, 8, 4, 4), (1, 16, 4, 4), ConvGeometry((1, 1)),
     torch.bfloat16, True),
    ("no pixels", (0, 16, 4, 4), (0, 16, 4, 4), ConvGeometry((1, 1)), torch.bfloat16, True),
])
def test_unsupported_layers_keep_the_pointer_kernel(why, x_shape, dy_shape, geometry, dtype,
                                                   channels_last, tma_wgrads):
    x = random_input(x_shape, dtype, "cpu", channels_last=channels_last)
    dy = random_input(dy_shape, dtype, "cpu", channels_last=channels_last)
    assert not tma_wgrad_supported(x, dy, geometry, Operand.SIXTEEN_BIT), why
    weight_shape = torch.Size((dy_shape[1], x_shape[1], *geometry.kernel))
    plan, _, _ = conv_ops.wgrad_plan(x, dy, weight_shape, True, geometry, Operand.SIXTEEN_BIT)
    assert any(launch.name.startswith("conv2d_wgrad[") for launch in plan) and not tma_wgrads


def test_tma_tiles_first_on_hopper_under_auto(monkeypatch):
    """auto on Hopper: the pointer kernel's static tile, then the TMA tiles, then the
    pointer kernel's other candidates; on Ampere only the pointer kernel's."""
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "auto")
    offered = {}

    def choose(family, shape, dtype, layout, device, static, candidates, trial):
        offered.update({generation: candidates(generation) for generation in Generation})
        return static
    monkeypatch.setattr(autotune, "choose", choose)
    x = random_input((1, 256, 4, 4), torch.bfloat16, "cpu", channels_last=True)
    dy = random_input((1, 256, 4, 4), torch.bfloat16, "cpu", channels_last=True)
    conv_ops.wgrad_plan(x, dy, torch.Size((256, 256, 1, 1)), True, ConvGeometry((1, 1)),
                        Operand.SIXTEEN_BIT)
    hopper = [tile.tma for tile in offered[Generation.HOPPER]]
    tma = hopper.count(True)
    assert tma >= 2 and hopper == [False] + [True] * tma + [False] * (len(hopper) - 1 - tma)
    assert not any(tile.tma for generation, tiles in offered.items()
                   if generation is not Generation.HOPPER for tile in tiles)
