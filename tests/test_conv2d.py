"""Conv2d forward (implicit GEMM), its fused epilogue, BatchNorm partial statistics, the
operator's autograd formula and fastarch.nn.Conv2d, against float64 torch in the interpreter."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend
from fastarch.kernels import conv2d as conv_kernels
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.tensor_cores import Operand
from fastarch.kernels.welford import merge_welford_partials
from fastarch.ops import conv2d as conv_ops
from fastarch.testing import (assert_close, assert_same_outcome, cudnn_tf32, random_input,
                              reference_grads)
from variants import alternating

# torch's own reference warns that padding='same' with an even kernel pads a copy.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# name -> (input shape, out channels, kernel, F.conv2d keyword arguments). The real layers
# shrunk spatially, and channel-shrunk past 64 channels; the first layers keep C = 1 or 3.
CONV_CASES = {
    "lenet_c1_1to6_5x5": ((2, 1, 12, 12), 6, (5, 5), {}),
    "lenet_c3_6to16_5x5": ((2, 6, 9, 9), 16, (5, 5), {}),
    "alexnet_c1_3to64_11x11_s4_p2": ((2, 3, 23, 23), 64, (11, 11), dict(stride=4, padding=2)),
    "alexnet_c2_5x5_p2": ((2, 16, 7, 7), 24, (5, 5), dict(padding=2)),
    "alexnet_c3_3x3_p1": ((2, 24, 5, 5), 40, (3, 3), dict(padding=1)),
    "alexnet_c5_3x3_p1": ((1, 32, 5, 5), 32, (3, 3), dict(padding=1)),
    "vgg_c1_1_3to64_3x3_p1": ((2, 3, 10, 10), 64, (3, 3), dict(padding=1)),
    "vgg_c1_2_64to64_3x3_p1": ((1, 64, 6, 6), 64, (3, 3), dict(padding=1)),
    "vgg_c3_3x3_p1_ragged_c": ((1, 48, 5, 6), 80, (3, 3), dict(padding=1)),
    "two_k_tiles_c160": ((1, 160, 4, 3), 16, (3, 3), dict(padding=1)),
    "two_n_tiles_k200": ((1, 16, 4, 4), 200, (3, 3), dict(padding=1)),
    "stride2_odd_size": ((2, 16, 9, 11), 16, (3, 3), dict(stride=2, padding=1)),
    "stride3_no_divide": ((1, 3, 11, 10), 8, (3, 3), dict(stride=3)),
    "dilation2": ((1, 16, 9, 9), 16, (3, 3), dict(padding=2, dilation=2)),
    "padding2": ((1, 5, 6, 7), 8, (3, 3), dict(padding=2)),
    "same_3x3": ((1, 16, 7, 6), 16, (3, 3), dict(padding="same")),
    "same_even_kernel_dilated": ((1, 3, 7, 8), 8, (4, 2), dict(padding="same", dilation=(1, 3))),
    "valid_3x3": ((1, 16, 6, 6), 16, (3, 3), dict(padding="valid")),
    "non_square_3x5": ((1, 16, 8, 9), 16, (3, 5), dict(stride=(2, 1), padding=(1, 2))),
    "non_square_small_c_2x3": ((1, 3, 6, 5), 8, (2, 3), dict(stride=(1, 2), padding=(0, 2))),
    "pointwise_1x1": ((2, 32, 5, 5), 16, (1, 1), {}),
    # First layers (C < SMALL_C) beyond the networks': dilated kernel rows (runs of CP
    # channels DW pixels apart), and C = 12 (CP = 16) with a 7-wide row of 112 lanes.
    "first_layer_c3_dilation2_stride2": ((1, 3, 13, 12), 8, (3, 3),
                                         dict(stride=2, padding=1, dilation=2)),
    "first_layer_c12_7x7_p3": ((1, 12, 9, 11), 8, (7, 7), dict(padding=3)),
}

# id -> (dtype, cuDNN TF32 switch, tolerance key)
DTYPES = {
    "fp32": (torch.float32, False, torch.float32),
    "tf32": (torch.float32, True, "tf32"),
    "fp16": (torch.float16, True, torch.float16),
    "bf16": (torch.bfloat16, True, torch.bfloat16),
}
LAYOUTS = {"nchw": False, "nhwc": True}


def _operands(case, dtype, device, channels_last=True, requires_grad=False):
    shape, k_out, kernel, _ = case
    x = random_input(shape, dtype, device, channels_last, requires_grad=requires_grad)
    weight = random_input((k_out, shape[1], *kernel), dtype, device,
                          requires_grad=requires_grad)
    bias = random_input((k_out,), dtype, device, requires_grad=requires_grad)
    return x, weight, bias


def _reduction(case) -> int:
    shape, _, kernel, _ = case
    return shape[1] * math.prod(kernel)


def _reference_conv(x, weight, bias, kwargs):
    return F.conv2d(x.detach().cpu().double(), weight.detach().cpu().double(),
                    None if bias is None else bias.detach().cpu().double(), **kwargs)


def _expect_channels_last(t: torch.Tensor, channels_last: bool, in_channels: int) -> None:
    """Outputs follow the input's format; a 1-channel input is NCHW and NHWC at once and
    counts as NCHW, as in the pools (a 1-channel ``t`` is both whatever we do)."""
    expected = (channels_last and in_channels > 1) or t.shape[1] == 1
    assert t.is_contiguous(memory_format=torch.channels_last) == expected


# ----------------------------------------------------------------------------- forward

@pytest.mark.gpu_check
@pytest.mark.parametrize("case_id, dtype_id, layout",
                         alternating(CONV_CASES, DTYPES, list(LAYOUTS)))
def test_conv2d_forward_matches_torch(case_id, dtype_id, layout, device):
    case = CONV_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(case, dtype, device, LAYOUTS[layout])
    with cudnn_tf32(tf32):
        y = fastarch.functional.conv2d(x, weight, bias, **case[3])
    assert_close(y, _reference_conv(x, weight, bias, case[3]), tolerance, _reduction(case))
    _expect_channels_last(y, LAYOUTS[layout], case[0][1])


def test_any_input_strides(device):
    """A sliced, non-dense input (neither NCHW nor NHWC) runs through its strides."""
    base = random_input((2, 20, 11, 9), torch.float32, device, channels_last=True)
    x = base[:, 2:18, 1:10:2, ::2]
    weight = random_input((8, 16, 3, 3), torch.float32, device)
    with cudnn_tf32(False):
        y = fastarch.functional.conv2d(x, weight, padding=1)
    assert_close(y, _reference_conv(x, weight, None, dict(padding=1)), torch.float32, 144)


def test_first_layer_padded_copy(device):
    """A first layer reads x as a dense [N, H', W', CP] copy holding the padding: its border
    and channels C .. CP - 1 zero, taken from any strides (here a non-dense slice)."""
    base = random_input((2, 5, 9, 12), torch.bfloat16, device)
    x = base[:, 1:4, 1:8, ::2]
    geometry = ConvGeometry((3, 3), padding=(1, 2), padding_end=(2, 1))
    copy = conv_ops.run_copy(x, geometry)
    assert copy.shape == (2, 7 + 3, 6 + 3, 8) and copy.is_contiguous()
    expected = F.pad(x.cpu(), (2, 1, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(copy[..., :3].cpu(), expected)
    assert not copy[..., 3:].cpu().any()


def test_unbatched_3d_input(device):
    x = random_input((3, 9, 8), torch.float32, device)
    weight = random_input((5, 3, 3, 3), torch.float32, device)
    bias = random_input((5,), torch.float32, device)
    with cudnn_tf32(False):
        y = fastarch.functional.conv2d(x, weight, bias, stride=2, padding=1)
    assert_close(y, _reference_conv(x, weight, bias, dict(stride=2, padding=1)),
                 torch.float32, 27)


@pytest.mark.parametrize("channels", [16, 3])
def test_empty_batch(channels, device):
    x = random_input((0, channels, 5, 5), torch.bfloat16, device, channels_last=True)
    weight = random_input((8, channels, 3, 3), torch.bfloat16, device)
    assert fastarch.functional.conv2d(x, weight).shape == (0, 8, 3, 3)


# id of a GPU config family -> a shrunk layer that picks it: (input shape, out channels,
# kernel, stride, padding). Each runs several K steps, and ragged tiles where it can.
TABLE_LAYERS = {
    "flat_n16": ((2, 6, 9, 9), 16, 5, 1, 0),            # LeNet conv2: K = 150, 5 steps
    "flat_n64": ((1, 3, 23, 23), 64, 11, 4, 2),         # AlexNet conv1: K = 363, 12 steps
    "chan_n64": ((2, 64, 6, 6), 64, 3, 1, 1),           # VGG conv1_2
    "chan_n128": ((1, 160, 5, 5), 136, 3, 1, 1),        # ragged C and a second N tile
    "fp32": ((1, 24, 6, 6), 72, 3, 1, 1),
}


@pytest.mark.parametrize("name", conv_ops.CONV_FORWARD.keys())
def test_every_gpu_config_computes_the_conv(name, device):
    """The shipped tiles themselves (the interpreter otherwise runs its own tile)."""
    config = conv_ops.CONV_FORWARD[name]
    family, operand = name.rsplit("_", 1)
    operand = Operand(operand)
    shape, k_out, k, stride, pad = TABLE_LAYERS[family]
    dtype = torch.bfloat16 if operand is Operand.SIXTEEN_BIT else torch.float32
    x, weight, bias = _operands((shape, k_out, (k, k), {}), dtype, device)
    geometry = ConvGeometry((k, k), (stride, stride), (pad, pad))
    y = backend.empty((shape[0], k_out, *geometry.output_size(*shape[2:])), dtype, device,
                      torch.channels_last)
    if shape[1] < conv_kernels.SMALL_C:  # the first-layer loop over x's padded copy
        weight = weight.to(memory_format=torch.channels_last)  # read through its strides
        conv_kernels.row_run_forward_launch(
            conv_ops.run_copy(x, geometry), weight, bias, None, None, False, y, None,
            geometry, operand, config)()
    else:
        conv_kernels.forward_launch(x, conv_ops.weight_matrix(weight), bias, None, None, False,
                                    y, None, geometry, operand, config)()
    reference = _reference_conv(x, weight, bias, dict(stride=stride, padding=pad))
    tolerance = {Operand.SIXTEEN_BIT: dtype, Operand.TF32: "tf32",
                 Operand.IEEE: torch.float32}[operand]
    assert_close(y, reference, tolerance, shape[1] * k * k)


# ----------------------------------------------------------------------------- epilogue

EPILOGUES = {
    "bias": dict(bias=True),
    "no_bias": dict(bias=False),
    "scale_shift": dict(bias=True, scale_shift=True),
    "relu": dict(bias=True, relu=True),
    "stats": dict(bias=True, stats=True),
    "scale_shift_relu_no_bias": dict(bias=False, scale_shift=True, relu=True),
    "all": dict(bias=True, scale_shift=True, relu=True, stats=True),
}
EPILOGUE_CASES = ["vgg_c1_1_3to64_3x3_p1", "vgg_c3_3x3_p1_ragged_c", "two_n_tiles_k200"]


def _epilogue_reference(conv: torch.Tensor, scale, shift, relu: bool) -> torch.Tensor:
    y = conv
    if scale is not None:
        y = y * scale.cpu().double().view(1, -1, 1, 1) + shift.cpu().double().view(1, -1, 1, 1)
    return torch.relu(y) if relu else y


def _fused_reference(x, weight, bias, scale, shift, relu, kwargs):
    """(float64 output, float64 conv + bias: what the statistics describe)."""
    conv = _reference_conv(x, weight, bias, kwargs)
    return _epilogue_reference(conv, scale, shift, relu), conv


def _merged_stats_match(partials, conv_ref: torch.Tensor, reduction: int) -> None:
    """The statistics come from the fp32 accumulator: products of 16-bit operands are exact
    in it, so they hold to fp32 tolerance whatever the input dtype (TF32 aside)."""
    tolerance = torch.float32
    var_ref, mean_ref = torch.var_mean(conv_ref, dim=(0, 2, 3), unbiased=False)
    assert all(t.dtype == torch.float32 for t in partials)
    pixels = conv_ref.numel() // conv_ref.shape[1]
    assert torch.equal(partials.count.sum(0).cpu(), torch.full_like(partials.count[0].cpu(),
                                                                    pixels))
    mean, var = merge_welford_partials(*partials)
    assert_close(mean, mean_ref.float(), tolerance, reduction, name="batch mean")
    # var is a mean of squares of values carrying the same absolute error: scale it by them.
    assert_close(var / var_ref.float().clamp_min(1), (var_ref / var_ref.clamp_min(1)).float(),
                 tolerance, reduction, name="batch var")


# Every case with every epilogue, the dtype alternating (the epilogue runs on the fp32
# accumulator: the dtype changes the main loop and the store, the same for every flag).
@pytest.mark.gpu_check
@pytest.mark.parametrize("case_id, epilogue_id, dtype_id",
                         alternating(EPILOGUE_CASES, EPILOGUES, ["fp32", "bf16"]))
def test_epilogue_flags(case_id, epilogue_id, dtype_id, device):
    case, flags = CONV_CASES[case_id], EPILOGUES[epilogue_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(case, dtype, device)
    bias = bias if flags.get("bias") else None
    scale = shift = None
    if flags.get("scale_shift"):
        scale = random_input((case[1],), torch.float32, device)
        shift = random_input((case[1],), torch.float32, device)
    relu, stats = flags.get("relu", False), flags.get("stats", False)
    with cudnn_tf32(tf32):
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], scale=scale,
                                                       shift=shift, relu=relu, stats=stats)
    y_ref, conv_ref = _fused_reference(x, weight, bias, scale, shift, relu, case[3])
    reduction = _reduction(case)
    assert_close(y, y_ref, tolerance, reduction)
    if relu:
        assert (y >= 0).all()
    assert (partials is not None) == stats
    if stats:
        _merged_stats_match(partials, conv_ref, reduction)


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
@pytest.mark.parametrize("case_id", ["lenet_c1_1to6_5x5", "alexnet_c1_3to64_11x11_s4_p2",
                                     "alexnet_c2_5x5_p2", "stride2_odd_size"])
@pytest.mark.gpu_check
def test_batchnorm_partial_stats_merge_to_torch_var_mean(case_id, dtype_id, device):
    """Several M tiles (the last one ragged) merged with Chan's formula == torch.var_mean."""
    case = CONV_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(case, dtype, device)
    with cudnn_tf32(tf32):
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], stats=True)
    conv_ref = _reference_conv(x, weight, bias, case[3])
    assert_close(y, conv_ref, tolerance, _reduction(case))
    _merged_stats_match(partials, conv_ref, _reduction(case))


def test_merge_welford_partials_is_chans_formula():
    values = torch.randn(37, 5, dtype=torch.float64) * 3 + 7
    groups = [values[:16], values[16:32], values[32:]]
    count = torch.tensor([[len(g)] * 5 for g in groups], dtype=torch.float64)
    mean = torch.stack([g.mean(0) for g in groups])
    m2 = torch.stack([((g - g.mean(0)) ** 2).sum(0) for g in groups])
    merged_mean, var = merge_welford_partials(count, mean, m2)
    _, unbiased = merge_welford_partials(count, mean, m2, unbiased=True)
    torch.testing.assert_close(merged_mean, values.mean(0))
    torch.testing.assert_close(var, values.var(0, unbiased=False))
    torch.testing.assert_close(unbiased, values.var(0, unbiased=True))


def test_relu_epilogue_keeps_nan_like_torch(device):
    x = random_input((1, 16, 4, 4), torch.float32, device, channels_last=True)
    x[0, :, 1, 2] = float("nan")
    weight = random_input((8, 16, 1, 1), torch.float32, device)
    y, _ = fastarch.functional.conv2d_fused(x, weight, relu=True)
    expected = torch.relu(F.conv2d(x, weight))
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(y).any()


# ----------------------------------------------------------------------------- residual

def _residual(shape, dtype, device, layout: str) -> torch.Tensor:
    """A residual of ``shape``: dense NCHW or NHWC ("nchw", "nhwc"), or ("slice") every other
    column of a wider channels_last tensor, in neither format."""
    if layout == "slice":
        wide = random_input((*shape[:3], 2 * shape[3]), dtype, device, channels_last=True)
        return wide[..., 1::2]
    return random_input(shape, dtype, device, LAYOUTS[layout])


# (case, x's layout, dtype, the residual's layout, scale/shift, ReLU, stats): the channel
# loop and a first layer's row runs, each in both formats, the residual in another layout.
RESIDUAL_EPILOGUES = [
    ("vgg_c3_3x3_p1_ragged_c", "nhwc", "bf16", "nchw", True, True, False),
    ("vgg_c3_3x3_p1_ragged_c", "nchw", "fp16", "slice", False, False, True),
    ("stride2_odd_size", "nhwc", "tf32", "slice", True, False, False),
    ("vgg_c1_1_3to64_3x3_p1", "nchw", "bf16", "nhwc", True, True, True),
    ("first_layer_c12_7x7_p3", "nhwc", "fp32", "nchw", False, True, False),
]


@pytest.mark.parametrize("case_id, layout, dtype_id, residual_layout, scale_shift, relu, stats",
                         RESIDUAL_EPILOGUES)
def test_residual_epilogue(case_id, layout, dtype_id, residual_layout, scale_shift, relu,
                           stats, device):
    """relu?((conv + bias) * scale + shift + residual) against float64 torch, the residual
    read through its strides; the statistics stay those of conv + bias."""
    case = CONV_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(case, dtype, device, LAYOUTS[layout])
    conv_ref = _reference_conv(x, weight, bias, case[3])
    residual = _residual(conv_ref.shape, dtype, device, residual_layout)
    scale = random_input((case[1],), torch.float32, device) if scale_shift else None
    shift = random_input((case[1],), torch.float32, device) if scale_shift else None
    with cudnn_tf32(tf32):
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], scale=scale,
                                                       shift=shift, relu=relu, stats=stats,
                                                       residual=residual)
    y_ref = _epilogue_reference(conv_ref, scale, shift, False) + residual.cpu().double()
    assert_close(y, torch.relu(y_ref) if relu else y_ref, tolerance, _reduction(case))
    _expect_channels_last(y, LAYOUTS[layout], case[0][1])
    if stats:
        _merged_stats_match(partials, conv_ref, _reduction(case))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_residual_epilogue_gradients(relu, device):
    """The residual's gradient is dy through the ReLU (the scale does not reach it); input,
    weight and bias get theirs as without it."""
    case = CONV_CASES["alexnet_c3_3x3_p1"]
    x, weight, bias = _operands(case, torch.float32, device, requires_grad=True)
    scale, shift = (random_input((case[1],), torch.float32, device) for _ in range(2))
    with cudnn_tf32(False):
        residual = _residual(_reference_conv(x, weight, bias, case[3]).shape, torch.float32,
                             device, "nhwc").requires_grad_()
        y, _ = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], scale=scale,
                                                shift=shift, relu=relu, residual=residual)
        dy = random_input(y.shape, torch.float32, device)
        y.backward(dy)

    def reference(x64, w64, b64, r64):
        out = _epilogue_reference(F.conv2d(x64, w64, b64, **case[3]), scale, shift, False)
        return torch.relu(out + r64) if relu else out + r64
    y_ref, grads_ref = reference_grads(reference, [x, weight, bias, residual], dy)
    pixels = y.numel() // y.shape[1]
    assert_close(y, y_ref, torch.float32, _reduction(case))
    for name, grad, ref, length in (("grad input", x.grad, grads_ref[0], 9 * case[1]),
                                    ("grad weight", weight.grad, grads_ref[1], pixels),
                                    ("grad bias", bias.grad, grads_ref[2], pixels),
                                    ("grad residual", residual.grad, grads_ref[3], 1)):
        assert_close(grad, ref, torch.float32, length, name=name)
    if relu:
        assert (residual.grad == 0).any() and (residual.grad != 0).any()


def test_residual_epilogue_gradient_alone(device):
    """A frozen conv: only the residual gets a gradient, dy where the output is positive."""
    x = random_input((1, 16, 4, 4), torch.float32, device, channels_last=True)
    weight = random_input((8, 16, 3, 3), torch.float32, device)
    residual = random_input((1, 8, 4, 4), torch.float32, device, requires_grad=True)
    y, _ = fastarch.functional.conv2d_fused(x, weight, padding=1, relu=True, residual=residual)
    dy = random_input(y.shape, torch.float32, device)
    y.backward(dy)
    assert torch.equal(residual.grad, torch.where(y > 0, dy, 0))
    assert (y == 0).any() and (y > 0).any()


def test_residual_epilogue_refuses_another_shape_or_dtype(device):
    case = CONV_CASES["alexnet_c3_3x3_p1"]
    x, weight, _ = _operands(case, torch.float32, device)
    y_shape = (*case[0][:1], case[1], *case[0][2:])  # padding 1: the input's size
    for residual in (torch.zeros(y_shape[:-1] + (4,), device=device),
                     torch.zeros(y_shape, dtype=torch.bfloat16, device=device)):
        with pytest.raises(ValueError, match="expected a residual of its output's shape"):
            fastarch.functional.conv2d_fused(x, weight, **case[3], residual=residual)


# ----------------------------------------------------------------------------- determinism

def test_two_runs_are_bitwise_equal(device):
    case = CONV_CASES["alexnet_c2_5x5_p2"]
    x, weight, bias = _operands(case, torch.bfloat16, device, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = weight.grad = bias.grad = None
        y, partials = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], stats=True)
        y.backward(torch.ones_like(y))
        runs.append((y, *partials, x.grad, weight.grad, bias.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------- autograd

GRAD_CASES = ["lenet_c1_1to6_5x5", "lenet_c3_6to16_5x5", "alexnet_c1_3to64_11x11_s4_p2",
              "alexnet_c3_3x3_p1", "vgg_c1_1_3to64_3x3_p1", "vgg_c3_3x3_p1_ragged_c",
              "stride3_no_divide", "dilation2", "same_even_kernel_dilated", "non_square_3x5"]


def _module_like(case, dtype, device, bias: bool = True):
    """A fastarch Conv2d and its torch twin holding the same parameters."""
    shape, k_out, kernel, kwargs = case
    ours = fastarch.nn.Conv2d(shape[1], k_out, kernel, bias=bias, **kwargs)
    ours = ours.to(device=device, dtype=dtype)
    twin = torch.nn.Conv2d(shape[1], k_out, kernel, bias=bias, **kwargs)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


@pytest.mark.gpu_check
@pytest.mark.parametrize("case_id, dtype_id, layout",
                         alternating(GRAD_CASES, ["fp32", "bf16"], list(LAYOUTS)))
def test_module_autograd_matches_torch(case_id, dtype_id, layout, device):
    _check_module_autograd(CONV_CASES[case_id], dtype_id, layout, device)


def _check_module_autograd(case, dtype_id: str, layout: str, device: str) -> None:
    """Output and every gradient of fastarch.nn.Conv2d on ``case`` against float64 torch."""
    dtype, tf32, tolerance = DTYPES[dtype_id]
    conv, twin = _module_like(case, dtype, device)
    x = random_input(case[0], dtype, device, LAYOUTS[layout], requires_grad=True)
    with cudnn_tf32(tf32):
        y = conv(x)
        dy = random_input(y.shape, dtype, device, LAYOUTS[layout])
        y.backward(dy)
    twin = twin.double()
    y_ref, (dx_ref,) = reference_grads(twin, [x], dy)
    dw_ref, db_ref = twin.weight.grad, twin.bias.grad
    pixels = y.numel() // y.shape[1]
    assert_close(y, y_ref, tolerance, _reduction(case), name="output")
    assert_close(x.grad, dx_ref, tolerance, case[1] * math.prod(case[2]), name="grad input")
    assert_close(conv.weight.grad, dw_ref, tolerance, pixels, name="grad weight")
    assert_close(conv.bias.grad, db_ref, tolerance, pixels, name="grad bias")
    _expect_channels_last(x.grad, LAYOUTS[layout], case[0][1])


# ----------------------------------------------------------------------------- TMA path

# The TMA kernels (FASTARCH_CONV_ALGO=tma) on every case: its geometry with C and K_out
# rounded up to the kernels' multiple of 16, channels_last, the tensor-core dtypes rotating.
# The forward and wgrad take it at stride 1 (other strides keep the pointer kernels), dgrad
# at every stride.
TMA_DTYPES = ("bf16", "fp16", "tf32")
TMA_CASES = [(case_id, TMA_DTYPES[i % len(TMA_DTYPES)]) for i, case_id in enumerate(CONV_CASES)]


def _tma_case(case):
    """``case`` with C and K_out rounded up to a multiple of 16."""
    (batch, channels, *size), k_out, kernel, kwargs = case
    return ((batch, -(-channels // 16) * 16, *size), -(-k_out // 16) * 16, kernel, kwargs)


def _stride_one(case) -> bool:
    return case[3].get("stride", 1) in (1, (1, 1))


@pytest.mark.parametrize("case_id, dtype_id", TMA_CASES)
def test_conv2d_forward_tma(case_id, dtype_id, device, monkeypatch, kernels_run):
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    case = _tma_case(CONV_CASES[case_id])
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, bias = _operands(case, dtype, device)
    with cudnn_tf32(tf32):
        y = fastarch.functional.conv2d(x, weight, bias, **case[3])
    assert_close(y, _reference_conv(x, weight, bias, case[3]), tolerance, _reduction(case))
    _expect_channels_last(y, True, case[0][1])
    assert ("conv2d_forward_tma_kernel" in kernels_run) == _stride_one(case), kernels_run


@pytest.mark.parametrize("case_id, dtype_id",
                         [(case_id, TMA_DTYPES[i % len(TMA_DTYPES)])
                          for i, case_id in enumerate(GRAD_CASES)])
def test_module_autograd_tma(case_id, dtype_id, device, monkeypatch, kernels_run):
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    case = _tma_case(CONV_CASES[case_id])
    _check_module_autograd(case, dtype_id, "nhwc", device)
    tma_runs = kernels_run.count("conv2d_forward_tma_kernel")
    assert tma_runs >= 1 + _stride_one(case), kernels_run  # dgrad (and the forward)
    assert ("conv2d_wgrad_tma_kernel" in kernels_run) == _stride_one(case), kernels_run


FUSED_GRAD_EPILOGUES = {"relu": (False, True), "scale_shift": (True, False),
                        "scale_shift_relu": (True, True)}


@pytest.mark.parametrize("epilogue_id", FUSED_GRAD_EPILOGUES.keys())
def test_fused_epilogue_gradients(epilogue_id, device):
    """Gradients flow through ReLU and the constant scale to input, weight and bias."""
    has_scale, relu = FUSED_GRAD_EPILOGUES[epilogue_id]
    case = CONV_CASES["alexnet_c3_3x3_p1"]
    x, weight, bias = _operands(case, torch.float32, device, requires_grad=True)
    scale = random_input((case[1],), torch.float32, device) if has_scale else None
    shift = random_input((case[1],), torch.float32, device) if has_scale else None
    with cudnn_tf32(False):
        y, _ = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], scale=scale,
                                                shift=shift, relu=relu)
        dy = random_input(y.shape, torch.float32, device)
        y.backward(dy)

    def reference(x64, w64, b64):
        return _epilogue_reference(F.conv2d(x64, w64, b64, **case[3]), scale, shift, relu)
    y_ref, grads_ref = reference_grads(reference, [x, weight, bias], dy)
    pixels = y.numel() // y.shape[1]
    assert_close(y, y_ref, torch.float32, _reduction(case))
    for name, grad, ref, length in (("grad input", x.grad, grads_ref[0], 9 * case[1]),
                                    ("grad weight", weight.grad, grads_ref[1], pixels),
                                    ("grad bias", bias.grad, grads_ref[2], pixels)):
        assert_close(grad, ref, torch.float32, length, name=name)


def test_frozen_weight_gets_bias_grad_only(device):
    case = CONV_CASES["alexnet_c5_3x3_p1"]
    x, weight, bias = _operands(case, torch.float32, device)
    bias.requires_grad_(True)
    with cudnn_tf32(False):
        y = fastarch.functional.conv2d(x, weight, bias, **case[3])
    y.backward(torch.ones_like(y))
    assert weight.grad is None and x.grad is None
    assert_close(bias.grad, torch.full((case[1],), 25.0, dtype=torch.float64), torch.float32,
                 25, name="grad bias")


def test_autocast_casts_like_torch(device):
    """Under autocast, fp32 parameters meet a bf16 input as in torch: both run in bf16."""
    case = CONV_CASES["alexnet_c3_3x3_p1"]
    conv, twin = _module_like(case, torch.float32, device)
    x = random_input(case[0], torch.float32, device, channels_last=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = conv(x)
        y_torch = twin.to(device)(x)
    assert y.dtype == y_torch.dtype == torch.bfloat16
    bf16 = [t.to(torch.bfloat16) for t in (x, twin.weight, twin.bias)]
    assert_close(y, _reference_conv(*bf16, case[3]), torch.bfloat16, _reduction(case))


# ----------------------------------------------------------------------------- module

MODULE_ARGS = {
    "lenet": dict(in_channels=1, out_channels=6, kernel_size=5),
    "alexnet_c1": dict(in_channels=3, out_channels=64, kernel_size=11, stride=4, padding=2),
    "same_no_bias": dict(in_channels=4, out_channels=8, kernel_size=(3, 4), padding="same",
                         dilation=2, bias=False),
}


@pytest.mark.parametrize("args_id", MODULE_ARGS.keys())
def test_module_is_torch_conv2d(args_id):
    kwargs = MODULE_ARGS[args_id]
    torch.manual_seed(1)
    ours = fastarch.nn.Conv2d(**kwargs)
    torch.manual_seed(1)
    twin = torch.nn.Conv2d(**kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.extra_repr() == twin.extra_repr()
    assert repr(ours) == repr(twin)
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(ours_state) == list(twin_state)
    assert all(torch.equal(ours_state[k], twin_state[k]) for k in ours_state)
    twin.load_state_dict(ours_state)


@pytest.mark.torch_fallback
@pytest.mark.parametrize("setting", ["groups", "padding_mode", "float64"])
def test_unaccelerated_settings_run_torch_and_are_counted(setting, device):
    kwargs = {"groups": dict(groups=2), "padding_mode": dict(padding_mode="reflect"),
              "float64": {}}[setting]
    dtype = torch.float64 if setting == "float64" else torch.float32
    conv = fastarch.nn.Conv2d(4, 6, 3, padding=1, **kwargs).to(device=device, dtype=dtype)
    twin = torch.nn.Conv2d(4, 6, 3, padding=1, **kwargs).to(device=device, dtype=dtype)
    twin.load_state_dict(conv.state_dict())
    x = random_input((2, 4, 6, 6), dtype, device)
    before = backend.fallback_counts["conv2d"]
    assert torch.equal(conv(x), twin(x))
    assert backend.fallback_counts["conv2d"] == before + 1


@pytest.mark.torch_fallback
def test_integer_input_runs_torchs_conv_and_is_counted(device):
    x, w, b = (torch.randint(-4, 5, shape, device=device) for shape in ((2, 3, 6, 6),
                                                                        (4, 3, 3, 3), (4,)))
    before = backend.fallback_counts["conv2d"]
    assert_same_outcome(lambda: fastarch.functional.conv2d(x, w, b, padding=1),
                        lambda: F.conv2d(x, w, b, padding=1))  # CUDA torch: NotImplementedError
    assert backend.fallback_counts["conv2d"] == before + 1


@pytest.mark.torch_fallback
def test_fused_fallback_float64(device):
    case = CONV_CASES["stride2_odd_size"]
    x, weight, bias = _operands(case, torch.float64, device)
    scale = random_input((case[1],), torch.float32, device)
    shift = random_input((case[1],), torch.float32, device)
    y, partials = fastarch.functional.conv2d_fused(x, weight, bias, **case[3], scale=scale,
                                                   shift=shift, relu=True, stats=True)
    y_ref, conv_ref = _fused_reference(x, weight, bias, scale, shift, True, case[3])
    torch.testing.assert_close(y, y_ref)
    mean, var = merge_welford_partials(*partials)
    var_ref, mean_ref = torch.var_mean(conv_ref, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


# ----------------------------------------------------------------------------- errors

def _bad_call(name: str, device: str):
    def randn(*shape):
        return torch.randn(*shape, device=device)
    x, w = randn(2, 3, 8, 8), randn(4, 3, 3, 3)
    ones = torch.ones(4, device=device)
    calls = {
        "channels_mismatch": lambda: fastarch.functional.conv2d(x, randn(4, 2, 3, 3)),
        "input_5d": lambda: fastarch.functional.conv2d(x[None], w),
        "input_2d": lambda: fastarch.functional.conv2d(x[0, 0], w),
        "weight_3d": lambda: fastarch.functional.conv2d(x, w[0]),
        "mixed_dtypes": lambda: fastarch.functional.conv2d(x, w.half()),
        "mixed_bias_dtype": lambda: fastarch.functional.conv2d(x, w, randn(4).half()),
        "bias_shape": lambda: fastarch.functional.conv2d(x, w, randn(5)),
        "weight_other_device": lambda: fastarch.functional.conv2d(x, w.to("meta")),
        "bias_other_device": lambda: fastarch.functional.conv2d(x, w, randn(4).to("meta")),
        "same_strided": lambda: fastarch.functional.conv2d(x, w, stride=2, padding="same"),
        "bad_padding_string": lambda: fastarch.functional.conv2d(x, w, padding="full"),
        "negative_padding": lambda: fastarch.functional.conv2d(x, w, padding=-1),
        "zero_stride": lambda: fastarch.functional.conv2d(x, w, stride=0),
        "three_strides": lambda: fastarch.functional.conv2d(x, w, stride=(1, 2, 3)),
        "zero_dilation": lambda: fastarch.functional.conv2d(x, w, dilation=0),
        "kernel_too_big": lambda: fastarch.functional.conv2d(x[..., :2, :2], w),
        "scale_without_shift": lambda: fastarch.functional.conv2d_fused(
            x, w, scale=ones),
        "scale_wrong_dtype": lambda: fastarch.functional.conv2d_fused(
            x, w, scale=ones.half(), shift=ones),
        "scale_requires_grad": lambda: fastarch.functional.conv2d_fused(
            x, w, scale=ones.clone().requires_grad_(), shift=ones),
    }
    return calls[name]


# name -> (torch's error type, what the message names)
ERRORS = {
    "channels_mismatch": (RuntimeError, "to have 2 channels, but got 3"),
    "input_5d": (RuntimeError, "3D \\(unbatched\\) or 4D"),
    "input_2d": (RuntimeError, "3D \\(unbatched\\) or 4D"),
    "weight_3d": (RuntimeError, "4D weight"),
    "mixed_dtypes": (RuntimeError, "weight dtype torch.float16"),
    "mixed_bias_dtype": (RuntimeError, "bias dtype torch.float16"),
    "bias_shape": (RuntimeError, "expected bias to be 1-dimensional with 4 elements"),
    "weight_other_device": (RuntimeError, "weight on meta"),
    "bias_other_device": (RuntimeError, "bias on meta"),
    "same_strided": (RuntimeError, "padding='same' is not supported for strided"),
    "bad_padding_string": (RuntimeError, "invalid padding string 'full'"),
    "negative_padding": (RuntimeError, "negative padding"),
    "zero_stride": (RuntimeError, "non-positive stride"),
    "three_strides": (RuntimeError, "expected stride to be a single integer value or a list of 2"),
    "zero_dilation": (RuntimeError, "non-positive dilation"),
    "kernel_too_big": (RuntimeError, "Kernel size can't be greater than actual input size"),
    "scale_without_shift": (RuntimeError, "scale and shift go together"),
    "scale_wrong_dtype": (RuntimeError, "expected scale to be a float32 tensor"),
    "scale_requires_grad": (RuntimeError, "scale must not require grad"),
}


@pytest.mark.parametrize("name", ERRORS.keys())
def test_bad_input_raises_torchs_error_type(name, device):
    error, message = ERRORS[name]
    with pytest.raises(error, match=message):
        _bad_call(name, device)()


# ----------------------------------------------------------------------------- TF32 switch

@pytest.mark.parametrize("setting", ["legacy_on", "legacy_off", "conv_ieee", "global_tf32"])
def test_tf32_follows_torchs_cudnn_conv_switch(setting):
    cudnn = torch.backends.cudnn
    saved_global, saved_legacy = torch.backends.fp32_precision, cudnn.allow_tf32
    try:
        if setting.startswith("legacy"):
            cudnn.allow_tf32 = setting == "legacy_on"
        elif setting == "conv_ieee":
            cudnn.conv.fp32_precision = "ieee"
        else:
            cudnn.allow_tf32 = False
            torch.backends.fp32_precision = "tf32"
        expected = setting in ("legacy_on", "global_tf32")
        assert backend.conv_operand(torch.float32) is (Operand.TF32 if expected
                                                       else Operand.IEEE)
        assert backend.conv_operand(torch.bfloat16) is Operand.SIXTEEN_BIT
    finally:
        # Restoring through the legacy switch leaves conv and RNN agreeing, as they started;
        # restoring the per-op values one by one leaves a state torch refuses to read.
        torch.backends.fp32_precision = saved_global
        cudnn.allow_tf32 = saved_legacy
    assert cudnn.allow_tf32 == saved_legacy
