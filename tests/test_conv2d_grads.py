"""Convolution backward kernels, called directly: dgrad (conv2d_input_grad) and wgrad with
the bias gradient (conv2d_weight_grad), against float64 torch on the same rounded inputs."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from fastarch.compile_report import all_launches
from fastarch.kernels.conv2d import SMALL_C, ConvGeometry
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import conv2d as conv_ops
from fastarch.ops.conv2d import conv2d_input_grad, conv2d_weight_grad
from fastarch.testing import assert_close, random_input

# NumPy's RuntimeWarnings inside the interpreted kernels (an integer division by zero, an
# overflow) are kernel bugs: fail on them.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@dataclass(frozen=True)
class Layer:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    geometry: ConvGeometry

    def output_size(self) -> tuple[int, int]:
        return self.geometry.output_size(self.height, self.width)


def geometry(kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), padding_end=None):
    return ConvGeometry(kernel, stride, padding, dilation, padding_end)


# The real layers shrunk (spatially and in channels; first layers keep C = 1 or 3), then
# geometries that stress the index math. "nondividing": H + 2p - d(k-1) - 1 is not a multiple
# of the stride, so the last input rows/columns are reached by no window (or fewer windows).
LAYERS = {
    "lenet_conv1_c1_5x5": Layer(2, 1, 12, 12, 6, geometry((5, 5))),
    "lenet_conv2_6to16_5x5": Layer(2, 6, 9, 9, 16, geometry((5, 5))),
    "alexnet_conv1_c3_11x11_s4_p2_nondividing": Layer(1, 3, 25, 26, 8,
                                                      geometry((11, 11), (4, 4), (2, 2))),
    "alexnet_conv2_5x5_p2": Layer(2, 16, 7, 7, 24, geometry((5, 5), padding=(2, 2))),
    "alexnet_conv3_3x3_p1": Layer(2, 24, 5, 5, 32, geometry((3, 3), padding=(1, 1))),
    "vgg_conv1_1_c3_3x3_p1": Layer(2, 3, 10, 10, 16, geometry((3, 3), padding=(1, 1))),
    "vgg_conv_16to32_3x3_p1": Layer(2, 16, 8, 8, 32, geometry((3, 3), padding=(1, 1))),
    "vgg_conv_32to32_3x3_p1_odd": Layer(1, 32, 7, 9, 32, geometry((3, 3), padding=(1, 1))),
    "odd_sizes_3x3_p1": Layer(3, 5, 7, 11, 7, geometry((3, 3), padding=(1, 1))),
    "stride2_p1": Layer(2, 4, 9, 10, 6, geometry((3, 3), (2, 2), (1, 1))),
    "stride2_p0_nondividing": Layer(2, 4, 10, 10, 6, geometry((3, 3), (2, 2))),
    "stride3_p1_nondividing": Layer(2, 4, 11, 13, 5, geometry((3, 3), (3, 3), (1, 1))),
    "stride3_kernel2_tapless_phase": Layer(2, 4, 10, 11, 5, geometry((2, 2), (3, 3))),
    "kernel1x1_stride2": Layer(2, 8, 7, 8, 6, geometry((1, 1), (2, 2))),
    "input_smaller_than_stride": Layer(2, 3, 2, 3, 4, geometry((1, 2), (3, 4), (0, 1))),
    "dilation2_p2": Layer(2, 4, 9, 9, 6, geometry((3, 3), padding=(2, 2), dilation=(2, 2))),
    "dilation2_stride2": Layer(2, 4, 11, 10, 6, geometry((3, 3), (2, 2), (1, 1), (2, 2))),
    "stride3x2_dilation2x1": Layer(2, 4, 12, 9, 6, geometry((3, 2), (3, 2), (1, 0), (2, 1))),
    "same_even_4x4": Layer(2, 4, 8, 9, 6, geometry((4, 4), padding=(1, 1),
                                                   padding_end=(2, 2))),
    "same_nonsquare_2x4": Layer(2, 4, 7, 8, 6, geometry((2, 4), padding=(0, 1),
                                                        padding_end=(1, 2))),
    "nonsquare_3x5_p1x2": Layer(2, 4, 8, 9, 6, geometry((3, 5), padding=(1, 2))),
    "nonsquare_5x1_s2x1_p2x0": Layer(2, 4, 11, 6, 6, geometry((5, 1), (2, 1), (2, 0))),
    "first_layer_c3_dilation2_s2": Layer(2, 3, 13, 12, 5,
                                         geometry((3, 3), (2, 2), (1, 1), (2, 2))),
    "first_layer_c12_7x7_p3": Layer(1, 12, 9, 11, 6, geometry((7, 7), padding=(3, 3))),
}

# Operand modes: (name for tolerances, storage dtype, allow_tf32).
MODES = {
    "fp32": (torch.float32, torch.float32, False),
    "tf32": ("tf32", torch.float32, True),
    "fp16": (torch.float16, torch.float16, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# dtype coverage on layers that take each distinct path (flattened and tap-aligned wgrad
# tiles, stride phases with and without taps, dilation, asymmetric padding), mostly in
# channels_last (the fast path).
DTYPE_CASES = (
    ("lenet_conv2_6to16_5x5", "nhwc"),
    ("alexnet_conv1_c3_11x11_s4_p2_nondividing", "nhwc"),
    ("vgg_conv1_1_c3_3x3_p1", "nhwc"),
    ("vgg_conv_16to32_3x3_p1", "nhwc"),
    ("stride2_p0_nondividing", "nhwc"),
    ("stride3_kernel2_tapless_phase", "nhwc"),
    ("dilation2_stride2", "nhwc"),
    ("same_even_4x4", "nhwc"),
    ("odd_sizes_3x3_p1", "nchw"),
    ("stride3_p1_nondividing", "nchw"),
    ("first_layer_c12_7x7_p3", "nhwc"),
)


def reference(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, geometry: ConvGeometry
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 dx, dw, db from torch.nn.grad; the (possibly asymmetric) padding is applied to
    the input explicitly and dx is cropped back."""
    (top, left), (bottom, right) = geometry.padding, geometry.end_padding()
    padded = F.pad(x.double(), (left, right, top, bottom))
    conv = {"stride": geometry.stride, "dilation": geometry.dilation}
    dx = torch.nn.grad.conv2d_input(padded.shape, weight.double(), dy.double(), **conv)
    dw = torch.nn.grad.conv2d_weight(padded, weight.shape, dy.double(), **conv)
    height, width = x.shape[2:]
    return dx[:, :, top:top + height, left:left + width], dw, dy.double().sum((0, 2, 3))


def make_inputs(layer: Layer, dtype: torch.dtype, memory_format: torch.memory_format
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, weight and dy; with channels_last activations the weight is channels_last too,
    as in a model converted with .to(memory_format=torch.channels_last)."""
    nhwc = memory_format == torch.channels_last
    x = random_input((layer.batch, layer.in_channels, layer.height, layer.width), dtype, "cpu",
                     channels_last=nhwc)
    weight = random_input((layer.out_channels, layer.in_channels) + layer.geometry.kernel,
                          dtype, "cpu", channels_last=nhwc)
    dy = random_input((layer.batch, layer.out_channels) + layer.output_size(), dtype, "cpu",
                      channels_last=nhwc)
    return x, weight, dy


def run_grads(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, geometry: ConvGeometry,
              memory_format: torch.memory_format, allow_tf32: bool, device: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weight, dy = x.to(device), weight.to(device), dy.to(device)
    operand = Operand.of(x.dtype, allow_tf32)
    dx, _ = conv2d_input_grad(dy, weight, x.shape, memory_format, geometry, operand)
    dw, db = conv2d_weight_grad(x, dy, weight.shape, geometry, True, operand,
                                dw_format=memory_format)
    return dx, dw, db


def check_grads(grads, refs, layer: Layer, mode: torch.dtype | str,
                memory_format: torch.memory_format) -> None:
    dx, dw, db = grads
    ref_dx, ref_dw, ref_db = refs
    kernel_taps = layer.geometry.kernel[0] * layer.geometry.kernel[1]
    pixels = layer.batch * layer.output_size()[0] * layer.output_size()[1]
    assert dx.is_contiguous(memory_format=memory_format), "grad input: memory format"
    assert dw.is_contiguous(memory_format=memory_format), "grad weight: memory format"
    assert_close(dx, ref_dx, mode, kernel_taps * layer.out_channels, "grad input")
    assert_close(dw, ref_dw, mode, pixels, "grad weight")
    assert_close(db, ref_db, mode, pixels, "grad bias")


# Every layer once, the layout alternating: the kernels take any strides (the layout changes
# no path in them), and the dtype cases below run layers in both.
FP32_CASES = [(name, list(FORMATS)[i % len(FORMATS)]) for i, name in enumerate(LAYERS)]


@pytest.mark.parametrize("name, fmt", FP32_CASES, ids=[f"{n}-{f}" for n, f in FP32_CASES])
def test_grads_fp32(name: str, fmt: str, device: str) -> None:
    layer, memory_format = LAYERS[name], FORMATS[fmt]
    x, weight, dy = make_inputs(layer, torch.float32, memory_format)
    grads = run_grads(x, weight, dy, layer.geometry, memory_format, False, device)
    check_grads(grads, reference(x, weight, dy, layer.geometry), layer, torch.float32,
                memory_format)


@pytest.mark.gpu_check
@pytest.mark.parametrize("mode", ("tf32", "fp16", "bf16"))
@pytest.mark.parametrize("name, fmt", DTYPE_CASES, ids=[f"{n}-{f}" for n, f in DTYPE_CASES])
def test_grads_dtypes(name: str, fmt: str, mode: str, device: str) -> None:
    layer, memory_format = LAYERS[name], FORMATS[fmt]
    tolerance_name, dtype, allow_tf32 = MODES[mode]
    x, weight, dy = make_inputs(layer, dtype, memory_format)
    grads = run_grads(x, weight, dy, layer.geometry, memory_format, allow_tf32, device)
    check_grads(grads, reference(x, weight, dy, layer.geometry), layer, tolerance_name,
                memory_format)


# The TMA kernels (FASTARCH_CONV_ALGO=tma) on every layer: its geometry with the channels
# rounded up to the kernels' multiple of 16, channels_last, the tensor-core modes rotating.
# dgrad takes the TMA path at every stride (a stride-1 convolution per phase), wgrad at
# stride 1; stride > 1 wgrads keep the pointer kernel.
TMA_MODES = ("bf16", "fp16", "tf32")
TMA_CASES = [(name, TMA_MODES[i % len(TMA_MODES)]) for i, name in enumerate(LAYERS)]


def tma_layer(layer: Layer) -> Layer:
    """``layer`` with C and K_out rounded up to a multiple of 16."""
    return replace(layer, in_channels=-(-layer.in_channels // 16) * 16,
                   out_channels=-(-layer.out_channels // 16) * 16)


@pytest.mark.parametrize("name, mode", TMA_CASES, ids=[f"{n}-{m}" for n, m in TMA_CASES])
def test_grads_tma(name: str, mode: str, device: str, monkeypatch, kernels_run) -> None:
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    layer = tma_layer(LAYERS[name])
    tolerance_name, dtype, allow_tf32 = MODES[mode]
    x, weight, dy = make_inputs(layer, dtype, torch.channels_last)
    grads = run_grads(x, weight, dy, layer.geometry, torch.channels_last, allow_tf32, device)
    check_grads(grads, reference(x, weight, dy, layer.geometry), layer, tolerance_name,
                torch.channels_last)
    assert "conv2d_forward_tma_kernel" in kernels_run, "dgrad: no TMA launch"
    stride_one = layer.geometry.stride == (1, 1)
    assert ("conv2d_wgrad_tma_kernel" in kernels_run) == stride_one, kernels_run
    assert ("conv2d_wgrad_kernel" in kernels_run) != stride_one, kernels_run


def test_rows_no_window_reaches_get_zero(device: str) -> None:
    """3x3 stride 2 on 10 rows/cols: windows cover 0..8, so row and column 9 of dx are 0."""
    layer = LAYERS["stride2_p0_nondividing"]
    x, weight, dy = make_inputs(layer, torch.float32, torch.channels_last)
    dx, _ = conv2d_input_grad(dy.to(device), weight.to(device), x.shape, torch.channels_last,
                              layer.geometry, Operand.IEEE)
    assert torch.equal(dx[:, :, 9, :].cpu(), torch.zeros_like(dx[:, :, 9, :].cpu()))
    assert torch.equal(dx[:, :, :, 9].cpu(), torch.zeros_like(dx[:, :, :, 9].cpu()))
    assert dx[:, :, :9, :9].abs().amin() > 0, "a covered element got no gradient"


@pytest.mark.parametrize("name", ("alexnet_conv1_c3_11x11_s4_p2_nondividing",
                                  "vgg_conv_16to32_3x3_p1"))
def test_two_runs_bitwise_equal(name: str, device: str) -> None:
    layer = LAYERS[name]
    x, weight, dy = make_inputs(layer, torch.bfloat16, torch.channels_last)
    first = run_grads(x, weight, dy, layer.geometry, torch.channels_last, False, device)
    second = run_grads(x, weight, dy, layer.geometry, torch.channels_last, False, device)
    for name_, a, b in zip(("grad input", "grad weight", "grad bias"), first, second):
        assert torch.equal(a, b), f"{name_} differs between two runs"


def test_expanded_grad_output(device: str) -> None:
    """dy with zero strides (the grad of a sum, expanded) is read through its strides."""
    layer = LAYERS["stride2_p1"]
    x, weight, _ = make_inputs(layer, torch.float32, torch.channels_last)
    dy = torch.randn(1, layer.out_channels, 1, 1).expand(
        (layer.batch, layer.out_channels) + layer.output_size())
    assert 0 in dy.stride()
    grads = run_grads(x, weight, dy, layer.geometry, torch.channels_last, False, device)
    check_grads(grads, reference(x, weight, dy, layer.geometry), layer, torch.float32,
                torch.channels_last)


def test_strided_views(device: str) -> None:
    """x and dy as non-dense views (every other column, a channel slice)."""
    layer = Layer(2, 4, 9, 8, 6, geometry((3, 3), (2, 2), (1, 1)))
    x = torch.randn(2, 6, 9, 16)[:, 1:5, :, ::2]
    weight = torch.randn(6, 4, 3, 3)
    dy = torch.randn((2, 8) + layer.output_size()).to(memory_format=torch.channels_last)[:, 1:7]
    assert not x.is_contiguous() and not dy.is_contiguous(memory_format=torch.channels_last)
    grads = run_grads(x, weight, dy, layer.geometry, torch.contiguous_format, False, device)
    check_grads(grads, reference(x, weight, dy, layer.geometry), layer, torch.float32,
                torch.contiguous_format)


def test_without_bias_grad(device: str) -> None:
    layer = LAYERS["vgg_conv1_1_c3_3x3_p1"]
    x, weight, dy = make_inputs(layer, torch.float32, torch.channels_last)
    dw, db = conv2d_weight_grad(x.to(device), dy.to(device), weight.shape, layer.geometry,
                                False, Operand.IEEE)
    assert db is None
    pixels = layer.batch * layer.output_size()[0] * layer.output_size()[1]
    assert_close(dw, reference(x, weight, dy, layer.geometry)[1], torch.float32, pixels,
                 "grad weight")


def test_empty_batch(device: str) -> None:
    """No pixels: dx is empty, dW and db are zeros (not left as uninitialized memory)."""
    layer = Layer(0, 3, 6, 6, 4, geometry((3, 3), padding=(1, 1)))
    x, weight, dy = make_inputs(layer, torch.float32, torch.channels_last)
    dx, dw, db = run_grads(x, weight, dy, layer.geometry, torch.channels_last, False, device)
    assert dx.shape == x.shape and dx.dtype == torch.float32
    assert torch.equal(dw.cpu(), torch.zeros(weight.shape))
    assert torch.equal(db.cpu(), torch.zeros(layer.out_channels))


@pytest.mark.parametrize("name, launches", (("lenet_conv1_c1_5x5", 3),
                                            ("input_smaller_than_stride", 1),
                                            ("vgg_conv_16to32_3x3_p1", 3)))
def test_wgrad_split_and_direct_paths(name: str, launches: int) -> None:
    """The interpreter config splits reductions of more than one minimal step (main kernel,
    weight merge, bias merge) and writes dW, db directly otherwise; the tests above run
    both. A first layer (C < SMALL_C) first writes x's padded copy."""
    layer = LAYERS[name]
    x, weight, dy = make_inputs(layer, torch.float32, torch.channels_last)
    plan, _, _ = conv_ops.wgrad_plan(x, dy, weight.shape, True, layer.geometry, Operand.IEEE,
                                     interpreter=True)
    copy = ["padded_copy"] if layer.in_channels < SMALL_C else []
    assert [launch.name.split("[")[0] for launch in plan] == copy + (
        ["conv2d_wgrad", "conv2d_wgrad_merge", "conv2d_wgrad_merge"][:launches])


@pytest.mark.parametrize("tiles, pixels", ((9, 64 * 224 * 224), (144, 64 * 14 * 14),
                                           (5, 1024 * 28 * 28), (2, 64 * 100)),
                         ids=("vgg_conv1_2", "vgg_conv5_3", "lenet_conv1", "short_reduction"))
def test_gpu_split_count(tiles: int, pixels: int) -> None:
    """GPU split-K (132 SMs, 64-pixel steps): the fewest splits that fill WGRAD_WAVES waves,
    or as many as leave each split WGRAD_MIN_SPLIT_STEPS steps when the reduction is short."""
    sms, steps = 132, pixels // 64
    programs_wanted = conv_ops.WGRAD_WAVES * sms
    splits = conv_ops.wgrad_splits(tiles, pixels, 64, sms, interpreter=False)
    assert steps // splits >= conv_ops.WGRAD_MIN_SPLIT_STEPS
    if splits * tiles >= programs_wanted:
        assert (splits - 1) * tiles < programs_wanted
    else:
        assert steps // (splits + 1) < conv_ops.WGRAD_MIN_SPLIT_STEPS


def config_names(launches, kernel: str) -> set[str]:
    """Config names of ``kernel``'s launches, without the _k<depth> and ,<variant>
    decorations."""
    return {re.sub(r"_k\d+$", "", launch.name.split("[")[1].rstrip("]").split(",")[0])
            for launch in launches if launch.name.startswith(f"{kernel}[")}


def test_compile_report_covers_every_config() -> None:
    launches = all_launches(["conv2d"])
    assert config_names(launches, "conv2d_forward") == set(conv_ops.CONV_FORWARD)
    assert config_names(launches, "conv2d_dgrad") == set(conv_ops.CONV_DGRAD)
    assert config_names(launches, "conv2d_wgrad") == set(conv_ops.CONV_WGRAD)
