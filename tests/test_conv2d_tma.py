"""The TMA conv forward (``kernels.conv2d_tma``) against float64 torch, forced with
FASTARCH_CONV_ALGO=tma (the interpreter runs tensor-descriptor loads, their zero fill of
out-of-bounds coordinates included); the layers it does not take keep the pointer kernel;
FASTARCH_CONV_ALGO itself; and the input gradient on the TMA kernel, stride phase by
stride phase."""
import json

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import autotune
from fastarch.kernels import conv2d_tma
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.conv2d_tma import tma_forward_launch, tma_m_tiles
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.tensor_cores import Operand
from fastarch.kernels.welford import WelfordPartials, merge_welford_partials
from fastarch.ops import conv2d as conv_ops
from fastarch.testing import assert_close, cudnn_tf32, random_input

# torch's own reference warns that padding='same' with an even kernel pads a copy.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# dtype id -> (dtype, cuDNN TF32 switch, tolerance key)
DTYPES = {
    "tf32": (torch.float32, True, "tf32"),
    "fp16": (torch.float16, True, torch.float16),
    "bf16": (torch.bfloat16, True, torch.bfloat16),
}

# name -> (input shape, out channels, kernel, F.conv2d keyword arguments, dtype id). Tiny:
# the interpreter pays per program and K step. C is a multiple of 16 (the TMA kernel's).
TMA_CASES = {
    "3x3_p1_batch2_odd_width": ((2, 16, 3, 5), 24, (3, 3), dict(padding=1), "bf16"),
    "3x3_p1_three_channel_steps": ((1, 48, 3, 4), 16, (3, 3), dict(padding=1), "tf32"),
    "1x1_two_channel_tiles": ((1, 160, 2, 3), 200, (1, 1), {}, "fp16"),
    "5x5_p2": ((1, 16, 3, 4), 8, (5, 5), dict(padding=2), "bf16"),
    "3x3_dilation2": ((1, 16, 4, 4), 16, (3, 3), dict(padding=2, dilation=2), "tf32"),
    "same_even_kernel": ((1, 16, 3, 5), 16, (2, 4), dict(padding="same"), "bf16"),
}


@pytest.fixture
def tma_launches(monkeypatch) -> list:
    """FASTARCH_CONV_ALGO=tma, and the TMA launches the forward builds."""
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    built = []

    def spy(*args, **kwargs):
        built.append(tma_forward_launch(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(conv_ops, "tma_forward_launch", spy)
    return built


def _operands(shape, k_out, kernel, dtype, device, bias=True):
    x = random_input(shape, dtype, device, channels_last=True)
    weight = random_input((k_out, shape[1], *kernel), dtype, device)
    return x, weight, random_input((k_out,), dtype, device) if bias else None


def _reference(x, weight, bias, kwargs):
    return F.conv2d(x.cpu().double(), weight.cpu().double(),
                    None if bias is None else bias.cpu().double(), **kwargs)


@pytest.mark.parametrize("case_id", TMA_CASES)
def test_tma_forward_matches_float64(case_id, tma_launches, device):
    shape, k_out, kernel, kwargs, dtype_id = TMA_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(shape, k_out, kernel, dtype, device)
    with cudnn_tf32(tf32):
        y = fastarch.functional.conv2d(x, weight, bias, **kwargs)
    assert len(tma_launches) == 1
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, _reference(x, weight, bias, kwargs), tolerance,
                 shape[1] * kernel[0] * kernel[1])


def _merged_stats_match(partials: WelfordPartials, conv_ref: torch.Tensor) -> None:
    var_ref, mean_ref = torch.var_mean(conv_ref, dim=(0, 2, 3), unbiased=False)
    pixels = conv_ref.numel() // conv_ref.shape[1]
    assert torch.equal(partials.count.sum(0).cpu(), torch.full_like(partials.count[0].cpu(),
                                                                    pixels))
    mean, var = merge_welford_partials(*partials)
    assert_close(mean, mean_ref.float(), torch.float32, 144, name="batch mean")
    assert_close(var / var_ref.float().clamp_min(1), (var_ref / var_ref.clamp_min(1)).float(),
                 torch.float32, 144, name="batch var")


@pytest.mark.parametrize("dtype_id, every_flag", [("bf16", True), ("tf32", False)])
def test_tma_epilogue_flags(dtype_id, every_flag, tma_launches, device):
    """bias, STATS, scale/shift and ReLU all at once; and none of them."""
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands((2, 16, 3, 5), 24, (3, 3), dtype, device, bias=every_flag)
    scale = random_input((24,), torch.float32, device) if every_flag else None
    shift = random_input((24,), torch.float32, device) if every_flag else None
    with cudnn_tf32(tf32):
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, padding=1, scale=scale,
                                                       shift=shift, relu=every_flag,
                                                       stats=every_flag)
    assert len(tma_launches) == 1
    conv = _reference(x, weight, bias, dict(padding=1))
    y_ref = conv
    if every_flag:
        y_ref = torch.relu(conv * scale.double().view(1, -1, 1, 1)
                           + shift.double().view(1, -1, 1, 1))
        _merged_stats_match(partials, conv)
    else:
        assert partials is None
    assert_close(y, y_ref, tolerance, 144)


# dtype id, the residual's layout, every other flag (bias, scale/shift, ReLU, STATS) or none
TMA_RESIDUALS = [("bf16", "nchw", True), ("fp16", "slice", False), ("tf32", "nhwc", True)]


@pytest.mark.parametrize("dtype_id, residual_layout, every_flag", TMA_RESIDUALS)
def test_tma_residual_epilogue(dtype_id, residual_layout, every_flag, tma_launches, device):
    """relu?((conv + bias) * scale + shift + residual), the residual through its strides
    (NCHW, NHWC, or a slice in neither format); the statistics stay those of conv + bias."""
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands((2, 16, 3, 5), 24, (3, 3), dtype, device, bias=every_flag)
    if residual_layout == "slice":
        residual = random_input((2, 24, 3, 10), dtype, device, channels_last=True)[..., 1::2]
    else:
        residual = random_input((2, 24, 3, 5), dtype, device,
                                channels_last=residual_layout == "nhwc")
    scale = random_input((24,), torch.float32, device) if every_flag else None
    shift = random_input((24,), torch.float32, device) if every_flag else None
    with cudnn_tf32(tf32):
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, padding=1, scale=scale,
                                                       shift=shift, relu=every_flag,
                                                       stats=every_flag, residual=residual)
    assert len(tma_launches) == 1 and tma_launches[0].constexprs["HAS_RESIDUAL"]
    conv = _reference(x, weight, bias, dict(padding=1))
    y_ref = conv + residual.cpu().double()
    if every_flag:
        y_ref = torch.relu(conv * scale.double().view(1, -1, 1, 1)
                           + shift.double().view(1, -1, 1, 1) + residual.cpu().double())
        _merged_stats_match(partials, conv)
    assert_close(y, y_ref, tolerance, 144)


def test_tma_stats_feed_batch_norm_training(tma_launches, device):
    """conv (bias, STATS) -> BatchNorm + ReLU in training, on the conv's partials."""
    x, weight, bias = _operands((2, 16, 3, 5), 24, (3, 3), torch.bfloat16, device)
    running_mean, running_var = torch.zeros(24, device=device), torch.ones(24, device=device)
    gamma, beta = (random_input((24,), torch.float32, device) for _ in range(2))
    y, partials = fastarch.functional.conv2d_fused(x, weight, bias, padding=1, stats=True)
    out = fastarch.functional.batch_norm_relu(y, running_mean, running_var, gamma, beta,
                                              training=True, partials=partials)
    assert len(tma_launches) == 1
    conv = _reference(x, weight, bias, dict(padding=1))
    mean_ref, var_ref = torch.zeros(24).double(), torch.ones(24).double()
    out_ref = torch.relu(F.batch_norm(conv, mean_ref, var_ref, gamma.cpu().double(),
                                      beta.cpu().double(), training=True))
    assert_close(out, out_ref, torch.bfloat16, 144)
    assert_close(running_mean, mean_ref.float(), torch.float32, 144, name="running mean")
    assert_close(running_var, var_ref.float(), torch.float32, 144, name="running var")


def _same_padded_3x3(shape, k_out, dtype, device):
    """x, weight and bias of a 3x3 padding-1 conv, and its NaN-filled outputs for a direct
    TMA launch on 16-pixel tiles: y (channels_last) and the STATS partials."""
    N, _, H, W = shape
    x, weight, bias = _operands(shape, k_out, (3, 3), dtype, device)
    y = torch.full((N, k_out, H, W), float("nan"), dtype=dtype,
                   device=device).to(memory_format=torch.channels_last)
    stats = torch.full((3, tma_m_tiles(N, H, W, 16), k_out), float("nan"), device=device)
    return x, weight, bias, y, stats


def test_several_tiles_a_row_with_a_ragged_last(device):
    """Q = 37 in 16-pixel tiles: three M tiles per output row, the last 5 pixels wide, each
    a row of the STATS partials."""
    x, weight, bias, y, stats = _same_padded_3x3((1, 16, 2, 37), 16, torch.float16, device)
    tiles = stats.shape[1]
    tile = TileConfig("test", 16, 16, 16, tma=True)
    tma_forward_launch(x, conv_ops.weight_matrix(weight), bias, None, None, False, y, stats,
                       ConvGeometry((3, 3), padding=(1, 1)), Operand.SIXTEEN_BIT, tile)()
    conv = _reference(x, weight, bias, dict(padding=1))
    assert_close(y, conv, torch.float16, 144)
    assert tiles == 6 and stats[0, :, 0].tolist() == [16, 16, 5] * 2
    _merged_stats_match(WelfordPartials(*stats), conv)


def test_persistent_programs_each_take_several_tiles(monkeypatch, device):
    """3 programs (one SM's PROGRAMS_PER_SM, set to 3) for 18 tiles: 9 M tiles (three
    16-pixel tiles a row of Q = 37, the last 5 wide) by 2 N tiles (K = 24 in 16-channel
    tiles, the last 8 wide), in a group of GROUP_M = 8 M tiles and a ragged one of 1; each M
    tile still one row of the STATS partials."""
    monkeypatch.setattr(conv2d_tma, "sm_count", lambda device: 1)
    monkeypatch.setattr(conv2d_tma, "PROGRAMS_PER_SM", 3)
    x, weight, bias, y, stats = _same_padded_3x3((1, 16, 3, 37), 24, torch.bfloat16, device)
    tiles = stats.shape[1]
    launch = tma_forward_launch(x, conv_ops.weight_matrix(weight), bias, None, None, False, y,
                                stats, ConvGeometry((3, 3), padding=(1, 1)),
                                Operand.SIXTEEN_BIT, TileConfig("test", 16, 16, 16, tma=True))
    launch()
    assert launch.grid == (3,) and tiles == 9 and conv2d_tma.GROUP_M == 8
    conv = _reference(x, weight, bias, dict(padding=1))
    assert_close(y, conv, torch.bfloat16, 144)
    assert stats[0, :, 0].tolist() == stats[0, :, -1].tolist() == [16, 16, 5] * 3
    _merged_stats_match(WelfordPartials(*stats), conv)


@pytest.mark.parametrize("case_id, dtype, channels_last, shape, kwargs", [
    ("stride2", torch.bfloat16, True, (1, 16, 5, 5), dict(stride=2, padding=1)),
    ("nchw_input", torch.bfloat16, False, (1, 16, 3, 3), dict(padding=1)),
    ("c_not_multiple_of_16", torch.bfloat16, True, (1, 24, 3, 3), dict(padding=1)),
    ("fp32_without_tf32", torch.float32, True, (1, 16, 3, 3), dict(padding=1)),
])
def test_ineligible_layers_keep_the_pointer_kernel(case_id, dtype, channels_last, shape,
                                                    kwargs, tma_launches, device):
    x = random_input(shape, dtype, device, channels_last=channels_last)
    weight = random_input((8, shape[1], 3, 3), dtype, device)
    with cudnn_tf32(False):
        y = fastarch.functional.conv2d(x, weight, None, **kwargs)
    assert tma_launches == []
    assert_close(y, _reference(x, weight, None, kwargs), dtype, shape[1] * 9)


def test_an_input_not_16_byte_aligned_keeps_the_pointer_kernel(tma_launches, device):
    """TMA's global address must be 16-byte aligned: x one element into its storage."""
    N, C, H, W = 1, 16, 3, 3
    storage = random_input((1 + N * H * W * C,), torch.bfloat16, device)
    x = storage[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    weight = random_input((8, C, 3, 3), torch.bfloat16, device)
    y = fastarch.functional.conv2d(x, weight, None, padding=1)
    assert tma_launches == []
    assert_close(y, _reference(x, weight, None, dict(padding=1)), torch.bfloat16, C * 9)


@pytest.mark.parametrize("value", [None, "auto", "pointer"])
def test_auto_and_pointer_keep_the_pointer_kernel_here(value, monkeypatch, device):
    """Off Hopper (the interpreter, Ampere) ``auto`` is the pointer kernel, as ``pointer``."""
    if value is None:
        monkeypatch.delenv("FASTARCH_CONV_ALGO", raising=False)
    else:
        monkeypatch.setenv("FASTARCH_CONV_ALGO", value)
    x = random_input((1, 16, 3, 3), torch.bfloat16, device, channels_last=True)
    static = conv_ops._forward_tile(x, torch.empty(8, 16, 3, 3), ConvGeometry((3, 3)),
                                    Operand.SIXTEEN_BIT, conv_ops.conv_algo(), stats=False)
    assert not static.tma


@pytest.fixture
def tuning_on_a_hopper(monkeypatch, tmp_path, device):
    """``auto`` with tuning on, the CPU standing in for a Hopper GPU (the interpreter runs the
    GPU tiles), timed by a clock that makes the static tile take 2 ms, the first candidate 1
    ms and every other 3: yields the one cache entry the test's call writes."""
    if device != "cpu":
        pytest.skip("the CPU stands in for a Hopper GPU")
    monkeypatch.setenv("FASTARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "on")
    monkeypatch.delenv("FASTARCH_CONV_ALGO", raising=False)
    monkeypatch.setattr(autotune, "runs_kernels", lambda device: True)
    times = iter([2.0, 1.0] + [3.0] * 10)

    def clock(run):
        run()
        return next(times)
    monkeypatch.setattr(autotune, "TIMER", clock)
    autotune.forget_loaded_caches()

    def entry() -> dict:
        (written,) = json.loads(next(tmp_path.glob("autotune-*.json")).read_text()).values()
        return written
    yield entry
    autotune.forget_loaded_caches()


def test_auto_tunes_tma_beside_pointer_tiles_on_hopper(tuning_on_a_hopper, device):
    """The TMA tiles are timed right after the static one, and a TMA winner runs."""
    # 64 channels on 65-pixel rows: one TMA candidate, tma_m128_n64.
    x, weight, bias = _operands((1, 16, 1, 65), 64, (1, 1), torch.bfloat16, device)
    y = fastarch.functional.conv2d(x, weight, bias)
    entry = tuning_on_a_hopper()
    assert entry["config"] == "tma_m128_n64_k16" and entry["tile"]["tma"]
    assert sum(not name.startswith("tma_") for name in entry["times_ms"]) > 1  # pointer
    assert_close(y, _reference(x, weight, bias, {}), torch.bfloat16, 16)


def test_bad_algorithm_is_a_value_error_naming_the_variable(monkeypatch, device):
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "cudnn")
    x = random_input((1, 16, 3, 3), torch.bfloat16, device, channels_last=True)
    weight = random_input((8, 16, 3, 3), torch.bfloat16, device)
    with pytest.raises(ValueError, match="FASTARCH_CONV_ALGO"):
        fastarch.functional.conv2d(x, weight, None, padding=1)


# ----------------------------------------------------------------------------- input gradient

# name -> (input shape, out channels, kernel, F.conv2d keyword arguments, dtype id,
# launches: one per stride phase, "zero" where no tap reaches it). K_out (dy's channels) is a
# multiple of 16; C need not be.
TMA_DGRAD_CASES = {
    "3x3_p1": ((2, 16, 3, 5), 16, (3, 3), dict(padding=1), "bf16", ["tma"]),
    "5x5_p2": ((1, 8, 3, 4), 16, (5, 5), dict(padding=2), "tf32", ["tma"]),
    "3x3_dilation2": ((1, 16, 4, 5), 16, (3, 3), dict(padding=2, dilation=2), "fp16",
                      ["tma"]),
    "same_even_kernel": ((1, 8, 3, 5), 16, (2, 4), dict(padding="same"), "bf16", ["tma"]),
    "3x3_p0": ((1, 8, 4, 5), 32, (3, 3), {}, "tf32", ["tma"]),
    "3x3_s2_p1": ((1, 8, 5, 6), 16, (3, 3), dict(stride=2, padding=1), "bf16",
                  ["tma"] * 4),
    "1x1_s2": ((1, 8, 4, 5), 16, (1, 1), dict(stride=2), "fp16", ["tma"] + ["zero"] * 3),
}


@pytest.fixture
def tma_dgrad_launches(monkeypatch) -> list:
    """FASTARCH_CONV_ALGO=tma, and the lists of launches the TMA input gradient builds."""
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    built = []

    def spy(*args, **kwargs):
        built.append(conv2d_tma.tma_dgrad_launches(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(conv_ops, "tma_dgrad_launches", spy)
    return built


def _kind(launch) -> str:
    return "tma" if launch.name.startswith("conv2d_dgrad_tma[") else \
        "zero" if launch.name.startswith("conv2d_zero_fill[") else launch.name


@pytest.mark.parametrize("case_id", TMA_DGRAD_CASES)
def test_tma_dgrad_matches_float64(case_id, tma_dgrad_launches, device):
    """dx through autograd (weight without grad: dgrad alone) against float64 torch; dx is
    NaN-poisoned, so every element must have been written."""
    shape, k_out, kernel, kwargs, dtype_id, kinds = TMA_DGRAD_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, _ = _operands(shape, k_out, kernel, dtype, device, bias=False)
    x.requires_grad_(True)
    x_ref = x.detach().cpu().double().requires_grad_(True)
    y_ref = F.conv2d(x_ref, weight.cpu().double(), **kwargs)
    dy = random_input(tuple(y_ref.shape), dtype, device, channels_last=True)
    y_ref.backward(dy.cpu().double())
    with cudnn_tf32(tf32):
        fastarch.functional.conv2d(x, weight, None, **kwargs).backward(dy)
    assert [[_kind(launch) for launch in launches] for launches in tma_dgrad_launches] == [kinds]
    assert_close(x.grad, x_ref.grad, tolerance, k_out * kernel[0] * kernel[1], name="dx")


@pytest.mark.parametrize("stride, padding, dilation", [
    (1, 1, 1), (1, 0, 2), (2, 1, 1), (2, 0, 1), (2, 2, 2), (3, 1, 2), (4, 2, 1)])
def test_dgrad_phase_taps_reach_what_the_direct_sum_does(stride, padding, dilation):
    """Per phase, the stride-1 window ``dgrad_phase_taps`` describes (tap first + (count - 1
    - j') * step at dy row i - padding + j' * dilation) is exactly the set of (tap, dy row)
    pairs the direct sum over h = p * stride - padding + r * dilation has."""
    taps, rows = 3, 11
    for phase in range(stride):
        window = conv2d_tma.dgrad_phase_taps(phase, padding, taps, stride, dilation)
        for i in range((rows - phase + stride - 1) // stride):
            h = phase + i * stride
            direct = {(r, (h + padding - r * dilation) // stride) for r in range(taps)
                      if (h + padding - r * dilation) % stride == 0}
            phased = {(window.first + (window.count - 1 - j) * window.step,
                       i - window.padding + j * window.dilation) for j in range(window.count)}
            assert phased == direct, (phase, i)


def test_dgrad_of_an_nchw_dy_keeps_the_pointer_kernel(tma_dgrad_launches, device):
    x = random_input((1, 16, 3, 3), torch.bfloat16, device, requires_grad=True)
    weight = random_input((16, 16, 3, 3), torch.bfloat16, device)
    x_ref = x.detach().cpu().double().requires_grad_(True)
    dy = random_input((1, 16, 3, 3), torch.bfloat16, device)
    F.conv2d(x_ref, weight.cpu().double(), padding=1).backward(dy.cpu().double())
    fastarch.functional.conv2d(x, weight, None, padding=1).backward(dy)
    assert tma_dgrad_launches == []
    assert_close(x.grad, x_ref.grad, torch.bfloat16, 16 * 9, name="dx")


def test_auto_tunes_tma_dgrad_beside_pointer_tiles_on_hopper(tuning_on_a_hopper, device):
    """The TMA dgrad tiles are timed right after the static pointer tile, and a TMA winner
    runs, phase by phase."""
    # 64 input channels, stride-2 phases 65 pixels wide: one TMA candidate, tma_m128_n64.
    geometry = ConvGeometry((1, 1), stride=(2, 2))
    weight = random_input((16, 64, 1, 1), torch.bfloat16, device)
    dy = random_input((1, 16, 1, 65), torch.bfloat16, device, channels_last=True)
    dx, _ = conv_ops.conv2d_input_grad(dy, weight, torch.Size((1, 64, 2, 130)),
                                       torch.channels_last, geometry, Operand.SIXTEEN_BIT)
    entry = tuning_on_a_hopper()
    assert entry["config"] == "tma_m128_n64_k16" and entry["tile"]["tma"]
    assert sum(not name.startswith("tma_") for name in entry["times_ms"]) > 1  # pointer
    dx_ref = F.conv_transpose2d(dy.double(), weight.double(), stride=2, output_padding=(1, 1))
    assert_close(dx, dx_ref, torch.bfloat16, 16)
