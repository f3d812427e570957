"""The pointer backward kernels' fused BatchNorm-gradient operands, launched directly against
float64 torch: dgrad and wgrad reading dy through a ``GradientPrologue`` (dy + scale * y +
shift; positions outside dy stay 0, which a nonzero shift would break), and dgrad's
``BatchNormGradEpilogue`` (dz masked where the input prologue's ReLU was off, du * scale
stored as dx, the per-row sums of du and du * (x - mean) summed here in row order). Every
output and sum row is NaN-filled first, so an element or row left unwritten fails. Tiles of
16: several M tiles, channel tiles (C = 20 leaves a ragged one) and K steps (24: a ragged
one) on tiny shapes."""
import pytest
import torch
import triton

from fastarch.kernels import conv2d_backward
from fastarch.kernels.conv2d import ConvGeometry, run_copy_shape
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.nhwc import BatchNormGradEpilogue, GradientPrologue, InputNormalization
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import conv2d as conv_ops
from fastarch.testing import random_input, tolerance
from fold_reference import assert_dgrad_folds_match, signed_vectors, through_prologue64

# dtype id -> (dtype, operand, tolerance key)
DTYPES = {"fp32": (torch.float32, Operand.IEEE, torch.float32),
          "bf16": (torch.bfloat16, Operand.SIXTEEN_BIT, torch.bfloat16)}

TILE = TileConfig("test", 16, 16, 16)

# name -> (dx shape, out channels, kernel, stride, padding, channels_last, dtype id)
DGRAD_CASES = {
    "3x3_s1_p1_c20_nchw_fp32": ((2, 20, 4, 5), 24, 3, 1, 1, False, "fp32"),
    "3x3_s2_p1_c20_nhwc_bf16": ((1, 20, 5, 6), 16, 3, 2, 1, True, "bf16"),
    # stride 2 of a 1x1: three of the four phases have no tap, their rows are zeros.
    "1x1_s2_c16_nhwc_fp32": ((2, 16, 3, 5), 24, 1, 2, 0, True, "fp32"),
    "1x1_s1_c20_nchw_bf16": ((1, 20, 3, 6), 24, 1, 1, 0, False, "bf16"),
}


def _grad_prologue(dy: torch.Tensor, device: str) -> GradientPrologue:
    """A prologue whose y is in the other memory format than dy (its own strides)."""
    y = random_input(tuple(dy.shape), dy.dtype, device,
                     channels_last=dy.is_contiguous())
    return GradientPrologue(y, *signed_vectors(dy.shape[1], device))


def _nan(shape, dtype, device, channels_last=False) -> torch.Tensor:
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return out.to(memory_format=torch.channels_last) if channels_last else out


def _epilogue(dx: torch.Tensor, relu: bool, rows: int, device: str) -> BatchNormGradEpilogue:
    N, C, H, W = dx.shape
    x = random_input((N, C, H, W), dx.dtype, device, channels_last=dx.is_contiguous())
    mean = torch.randn(2 * C, device=device)[1::2]
    normalization = InputNormalization(*signed_vectors(C, device), relu)
    return BatchNormGradEpilogue(x, mean, normalization,
                                 _nan((rows, 2, C), torch.float32, device))


@pytest.mark.parametrize("fold", ["grad_prologue", "bn_grad", "bn_grad_relu", "both_relu"])
@pytest.mark.parametrize("case_id", DGRAD_CASES)
def test_dgrad_folds_match_float64(case_id, fold, device):
    shape, k_out, kernel, stride, padding, channels_last, dtype_id = DGRAD_CASES[case_id]
    dtype, operand, key = DTYPES[dtype_id]
    N, C, H, W = shape
    geometry = ConvGeometry((kernel, kernel), (stride, stride), (padding, padding))
    P, Q = geometry.output_size(H, W)
    weight = random_input((k_out, C, kernel, kernel), dtype, device)
    dy = random_input((N, k_out, P, Q), dtype, device, channels_last=channels_last)
    dx = _nan(shape, dtype, device, channels_last)
    rows = conv2d_backward.dgrad_sum_rows(shape, geometry, TILE)
    grad_prologue = _grad_prologue(dy, device) if fold in ("grad_prologue", "both_relu") \
        else None
    epilogue = None if fold == "grad_prologue" else \
        _epilogue(dx, fold.endswith("relu"), rows, device)
    launch = conv2d_backward.dgrad_launch(dy, conv_ops.dgrad_weight(weight), dx, geometry,
                                          operand, TILE, grad_prologue=grad_prologue,
                                          epilogue=epilogue)
    assert launch.grid[0] * launch.grid[2] == rows
    launch()
    assert_dgrad_folds_match(dx, dy, weight, stride, padding, grad_prologue, epilogue, key)


def test_a_nan_pre_activation_passes_its_gradient(device):
    """torch's threshold_backward passes the gradient where the ReLU's input is NaN (NaN <= 0
    is false), and so does the epilogue's mask: du = dz there, dx = dz * scale, and the
    channel's sum of du * (x - mean) is NaN, as torch's."""
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    weight = random_input((16, 16, 3, 3), torch.float32, device)
    dy = random_input((1, 16, 3, 4), torch.float32, device, channels_last=True)
    dx = _nan((1, 16, 3, 4), torch.float32, device, channels_last=True)
    epilogue = _epilogue(dx, True, conv2d_backward.dgrad_sum_rows(dx.shape, geometry, TILE),
                         device)
    epilogue.x[0, 5, 1, 2] = float("nan")
    conv2d_backward.dgrad_launch(dy, conv_ops.dgrad_weight(weight), dx, geometry,
                                 Operand.IEEE, TILE, epilogue=epilogue)()
    dz = torch.nn.grad.conv2d_input(dx.shape, weight.cpu().double(), dy.cpu().double(),
                                    padding=1)
    scale = epilogue.normalization.scale[5].item()
    torch.testing.assert_close(dx[0, 5, 1, 2].item(), dz[0, 5, 1, 2].item() * scale,
                               rtol=1e-4, atol=1e-5)
    sums = epilogue.sums.sum(0)
    assert sums[1, 5].isnan() and sums[0, 5].isfinite()
    assert sums[:, torch.arange(16) != 5].isfinite().all()


def test_launch_names_mark_the_folds(device):
    """The ledger tells the fused launches apart by name; without them, names stay."""
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    dy = random_input((1, 16, 2, 2), torch.float32, device)
    dx = _nan((1, 16, 2, 2), torch.float32, device)
    weight = conv_ops.dgrad_weight(random_input((16, 16, 3, 3), torch.float32, device))
    rows = conv2d_backward.dgrad_sum_rows(dx.shape, geometry, TILE)
    names = [conv2d_backward.dgrad_launch(dy, weight, dx, geometry, Operand.IEEE, TILE,
                                          grad_prologue=prologue, epilogue=epilogue).name
             for prologue, epilogue in ((None, None), (_grad_prologue(dy, device), None),
                                        (None, _epilogue(dx, True, rows, device)))]
    assert names == ["conv2d_dgrad[test]", "conv2d_dgrad[test,grad_prologue]",
                     "conv2d_dgrad[test,bn_grad_relu]"]
    x = random_input((1, 16, 2, 2), torch.float32, device)
    out = _nan((2, 3, 3, 16, 16), torch.float32, device)
    assert [conv2d_backward.wgrad_launch(x, dy, out, None, 2, 2, geometry, Operand.IEEE,
                                         TILE, grad_prologue=prologue).name
            for prologue in (None, _grad_prologue(dy, device))] == [
        "conv2d_wgrad[test]", "conv2d_wgrad[test,grad_prologue]"]


# name -> (x shape, out channels, kernel, stride, padding, channels_last, dtype id, tile,
# with an input prologue). C = 20 in 32-column tiles flattens (r, s, c); C = 16 in 16 is
# tap-aligned; C = 3 is a first layer, its padded copy read in row runs.
WGRAD_CASES = {
    "3x3_p1_c20_nchw_bf16": ((2, 20, 3, 4), 24, 3, 1, 1, False, "bf16",
                             TileConfig("test", 32, 16, 16), False),
    "3x3_s2_p1_c16_nhwc_fp32_input_prologue": ((2, 16, 5, 4), 24, 3, 2, 1, True, "fp32",
                                               TILE, True),
    "first_layer_3x3_p1_c3_nchw_bf16": ((2, 3, 4, 5), 16, 3, 1, 1, False, "bf16",
                                        TileConfig("test", 64, 16, 16), False),
}


@pytest.mark.parametrize("case_id", WGRAD_CASES)
def test_wgrad_grad_prologue_matches_float64(case_id, device):
    """dW and db in two split partials, db summing the transformed dy."""
    shape, k_out, kernel, stride, padding, channels_last, dtype_id, tile, with_input = \
        WGRAD_CASES[case_id]
    dtype, operand, key = DTYPES[dtype_id]
    N, C, H, W = shape
    geometry = ConvGeometry((kernel, kernel), (stride, stride), (padding, padding))
    P, Q = geometry.output_size(H, W)
    x = random_input(shape, dtype, device, channels_last=channels_last)
    dy = random_input((N, k_out, P, Q), dtype, device, channels_last=channels_last)
    grad_prologue = _grad_prologue(dy, device)
    pixels, splits = N * P * Q, 2
    per_split = triton.cdiv(pixels, splits * tile.block_k) * tile.block_k
    out = _nan((splits, kernel, kernel, C, k_out), torch.float32, device)
    bias_out = _nan((splits, k_out), torch.float32, device)
    x64 = x.cpu().double()
    if C < conv_ops.SMALL_C:
        x_run = conv_ops.run_copy(x, geometry)
        assert tuple(x_run.shape) == run_copy_shape(shape, geometry, dtype)
        launch = conv2d_backward.row_run_wgrad_launch(
            x_run, dy, out, bias_out, splits, per_split, geometry, operand, tile,
            grad_prologue=grad_prologue)
    else:
        prologue = InputNormalization(*signed_vectors(C, device), True) if with_input else None
        if prologue is not None:
            view = (1, -1, 1, 1)
            x64 = (x64 * prologue.scale.cpu().double().view(view)
                   + prologue.shift.cpu().double().view(view)).relu()
        launch = conv2d_backward.wgrad_launch(
            x, dy, out, bias_out, splits, per_split, geometry, operand, tile,
            prologue=prologue, grad_prologue=grad_prologue)
    launch()
    g64 = through_prologue64(dy, grad_prologue)
    dw_ref = torch.nn.grad.conv2d_weight(x64, (k_out, C, kernel, kernel), g64, stride=stride,
                                         padding=padding)
    rtol, atol = tolerance(key, pixels)
    torch.testing.assert_close(out.sum(0).double(), dw_ref.permute(2, 3, 1, 0), rtol=rtol,
                               atol=atol, msg=lambda m: f"grad weight: {m}")
    torch.testing.assert_close(bias_out.sum(0).double(), g64.sum((0, 2, 3)), rtol=rtol,
                               atol=atol, msg=lambda m: f"grad bias: {m}")
