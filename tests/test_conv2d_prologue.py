"""The convolutions' input prologue (``kernels.conv2d.InputNormalization``): the forward and
the weight gradient read x as relu?(x * scale[c] + shift[c]), against float64 torch of
conv(relu?(x * scale + shift)) with zero padding. The shifts make relu(shift) > 0, so a
padding element transformed instead of kept 0 fails. Every path: the pointer kernels (NCHW,
NHWC, C not a multiple of the K step), a first layer's padded copy (row runs), the TMA
kernels forced with FASTARCH_CONV_ALGO=tma; the epilogue flags beside a prologue."""
import pytest
import torch
import torch.nn.functional as F

from fastarch import backend
from fastarch.kernels.conv2d import ConvGeometry, InputNormalization
from fastarch.kernels.welford import merge_welford_partials
from fastarch.ops import conv2d as conv_ops
from fastarch.testing import assert_close, cudnn_tf32, random_input, tolerance

# dtype id -> (dtype, tolerance key)
DTYPES = {"tf32": (torch.float32, "tf32"), "fp16": (torch.float16, torch.float16),
          "bf16": (torch.bfloat16, torch.bfloat16)}

# name -> (input shape, channels_last, out channels, kernel, padding, dtype id, algo, the
# kernels that must run). Tiny: the interpreter pays per program and K step.
FORWARD_CASES = {
    "pointer_nchw_c20": ((2, 20, 3, 4), False, 8, 3, 1, "bf16", "auto",
                         ["conv2d_forward_kernel"]),
    "pointer_nhwc_c16": ((1, 16, 4, 3), True, 8, 3, 1, "fp16", "auto",
                         ["conv2d_forward_kernel"]),
    "pointer_nhwc_tf32_5x5": ((1, 16, 3, 3), True, 8, 5, 2, "tf32", "auto",
                              ["conv2d_forward_kernel"]),
    "first_layer_c3": ((2, 3, 4, 5), False, 8, 3, 1, "bf16", "auto",
                       ["padded_copy_kernel", "conv2d_forward_kernel"]),
    "first_layer_c6_nhwc": ((1, 6, 5, 4), True, 8, 3, 2, "tf32", "auto",
                            ["padded_copy_kernel", "conv2d_forward_kernel"]),
    "tma_c16": ((2, 16, 3, 5), True, 24, 3, 1, "bf16", "tma", ["conv2d_forward_tma_kernel"]),
    "tma_c32_tf32": ((1, 32, 3, 4), True, 16, 3, 1, "tf32", "tma",
                     ["conv2d_forward_tma_kernel"]),
    "tma_c16_fp16_5x5": ((1, 16, 3, 4), True, 8, 5, 2, "fp16", "tma",
                         ["conv2d_forward_tma_kernel"]),
}

# name -> (input shape, channels_last, out channels, kernel, padding, dtype id, algo, the
# wgrad's main kernel).
WGRAD_CASES = {
    "pointer_nchw_c20": ((2, 20, 3, 4), False, 8, 3, 1, "bf16", "auto", "conv2d_wgrad_kernel"),
    "pointer_nhwc_c16": ((1, 16, 4, 3), True, 8, 3, 1, "tf32", "auto", "conv2d_wgrad_kernel"),
    "first_layer_c3": ((2, 3, 4, 5), False, 8, 3, 1, "fp16", "auto", "conv2d_wgrad_kernel"),
    "tma_c16": ((2, 16, 3, 5), True, 16, 3, 1, "bf16", "tma", "conv2d_wgrad_tma_kernel"),
    "tma_c16_fp16_5x5": ((1, 16, 3, 4), True, 8, 5, 2, "fp16", "tma",
                         "conv2d_wgrad_tma_kernel"),
}


def _prologue(channels: int, relu: bool, device: str) -> InputNormalization:
    """Scales of both signs, |scale| in [0.5, 1), strided (every other element of a longer
    vector), and shifts in [0.25, 0.75): relu(shift) > 0, so padding transformed would not be
    0; the normalized x stays near unit scale, as the tolerances assume."""
    magnitude = torch.rand(2 * channels, dtype=torch.float32, device=device) * 0.5 + 0.5
    sign = torch.randint(0, 2, (2 * channels,), device=device) * 2 - 1
    scale = (magnitude * sign)[::2]
    shift = torch.rand(channels, dtype=torch.float32, device=device) * 0.5 + 0.25
    return InputNormalization(scale, shift, relu)


def _normalized64(x: torch.Tensor, prologue: InputNormalization) -> torch.Tensor:
    """relu?(x * scale + shift) in float64 on the CPU."""
    view = (1, -1, 1, 1)
    z = (x.cpu().double() * prologue.scale.cpu().double().view(view)
         + prologue.shift.cpu().double().view(view))
    return z.relu() if prologue.relu else z


def _operands(shape, channels_last, k_out, kernel, dtype, device):
    x = random_input(shape, dtype, device, channels_last=channels_last)
    weight = random_input((k_out, shape[1], kernel, kernel), dtype, device,
                          channels_last=channels_last)
    return x, weight


@pytest.mark.parametrize("relu", [False, True], ids=["affine", "relu"])
@pytest.mark.parametrize("case_id", FORWARD_CASES)
def test_forward_prologue_matches_float64(case_id, relu, kernels_run, monkeypatch, device):
    shape, channels_last, k_out, kernel, padding, dtype_id, algo, kernels = \
        FORWARD_CASES[case_id]
    monkeypatch.setenv("FASTARCH_CONV_ALGO", algo)
    dtype, tolerance = DTYPES[dtype_id]
    x, weight = _operands(shape, channels_last, k_out, kernel, dtype, device)
    prologue = _prologue(shape[1], relu, device)
    geometry = ConvGeometry((kernel, kernel), padding=(padding, padding))
    with cudnn_tf32(True):
        y, _ = conv_ops.conv2d_forward(x, weight, None, geometry, None, None, False, False,
                                       prologue=prologue)
    assert kernels_run == kernels
    reference = F.conv2d(_normalized64(x, prologue), weight.cpu().double(), padding=padding)
    assert_close(y, reference, tolerance, shape[1] * kernel * kernel)


@pytest.mark.parametrize("case_id", ["pointer_nhwc_c16", "first_layer_c3", "tma_c16"])
def test_forward_prologue_with_every_epilogue_flag(case_id, kernels_run, monkeypatch, device):
    """Bias, STATS (of conv + bias), scale/shift and ReLU after a prologue with ReLU."""
    shape, channels_last, k_out, kernel, padding, dtype_id, algo, kernels = \
        FORWARD_CASES[case_id]
    monkeypatch.setenv("FASTARCH_CONV_ALGO", algo)
    dtype, tolerance_key = DTYPES[dtype_id]
    x, weight = _operands(shape, channels_last, k_out, kernel, dtype, device)
    bias = random_input((k_out,), dtype, device)
    out_scale = torch.randn(k_out, dtype=torch.float32, device=device)
    out_shift = torch.randn(k_out, dtype=torch.float32, device=device)
    prologue = _prologue(shape[1], True, device)
    geometry = ConvGeometry((kernel, kernel), padding=(padding, padding))
    y, partials = conv_ops.conv2d_forward(x, weight, bias, geometry, out_scale, out_shift,
                                          True, True, prologue=prologue)
    assert kernels_run == kernels
    conv = F.conv2d(_normalized64(x, prologue), weight.cpu().double(),
                    bias.cpu().double(), padding=padding)
    view = (1, -1, 1, 1)
    reference = (conv * out_scale.cpu().double().view(view)
                 + out_shift.cpu().double().view(view)).relu()
    reduction = shape[1] * kernel * kernel
    assert_close(y, reference, tolerance_key, reduction)
    # fp32 statistics of a conv of rounded operands: the operands' tolerance.
    rtol, atol = tolerance(tolerance_key, reduction)
    mean, var = merge_welford_partials(*partials)
    torch.testing.assert_close(mean.double(), conv.mean((0, 2, 3)), rtol=rtol, atol=atol)
    torch.testing.assert_close(var.double(), conv.var((0, 2, 3), unbiased=False),
                               rtol=rtol, atol=atol * conv.abs().max().item())


@pytest.mark.parametrize("relu", [False, True], ids=["affine", "relu"])
@pytest.mark.parametrize("case_id", WGRAD_CASES)
def test_wgrad_prologue_matches_float64(case_id, relu, kernels_run, monkeypatch, device):
    shape, channels_last, k_out, kernel, padding, dtype_id, algo, main = WGRAD_CASES[case_id]
    monkeypatch.setenv("FASTARCH_CONV_ALGO", algo)
    dtype, tolerance = DTYPES[dtype_id]
    x, weight = _operands(shape, channels_last, k_out, kernel, dtype, device)
    prologue = _prologue(shape[1], relu, device)
    geometry = ConvGeometry((kernel, kernel), padding=(padding, padding))
    x64 = _normalized64(x, prologue)
    out_size = F.conv2d(x64, weight.cpu().double(), padding=padding).shape
    dy = random_input(out_size, dtype, device, channels_last=channels_last)
    with cudnn_tf32(True):
        dw, db = conv_ops.conv2d_weight_grad(x, dy, weight.shape, geometry, True,
                                             backend.conv_operand(dtype), prologue=prologue)
    assert main in kernels_run
    assert ("padded_copy_kernel" in kernels_run) == (shape[1] < conv_ops.SMALL_C)
    dw_ref = torch.nn.grad.conv2d_weight(x64, weight.shape, dy.cpu().double(),
                                         padding=padding)
    pixels = out_size[0] * out_size[2] * out_size[3]
    assert_close(dw, dw_ref, tolerance, pixels, "grad weight")
    assert_close(db, dy.cpu().double().sum((0, 2, 3)), tolerance, pixels, "grad bias")


def test_autotune_key_names_the_prologue(monkeypatch, device):
    """The forward's and wgrad's tuning keys get a "prologue" entry, and only with one."""
    keys = []
    tuned_tile = conv_ops.tuned_tile

    def spy(op, shape, *args):
        keys.append((op, shape))
        return tuned_tile(op, shape, *args)
    monkeypatch.setattr(conv_ops, "tuned_tile", spy)
    x, weight = _operands((1, 16, 2, 2), False, 8, 1, torch.bfloat16, device)
    geometry = ConvGeometry((1, 1))
    for prologue in (None, _prologue(16, True, device), _prologue(16, False, device)):
        conv_ops.conv2d_forward(x, weight, None, geometry, None, None, False, False,
                                prologue=prologue)
        conv_ops.conv2d_weight_grad(x, x[:, :8], weight.shape, geometry, False,
                                    backend.conv_operand(x.dtype), prologue=prologue)
    assert [(op, shape.get("prologue")) for op, shape in keys] == [
        ("conv2d_forward", None), ("conv2d_wgrad", None),
        ("conv2d_forward", "relu"), ("conv2d_wgrad", "relu"),
        ("conv2d_forward", "affine"), ("conv2d_wgrad", "affine")]
