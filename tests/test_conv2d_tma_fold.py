"""The backward folds of a BatchNorm on the TMA kernels (``kernels.conv2d_tma``,
``kernels.conv2d_tma_wgrad``), launched directly on 16-wide tiles under the interpreter, into
NaN-filled outputs, against float64 torch: the input gradient reading dy through a
``GradientPrologue`` (dy + scale * y + shift, positions outside dy staying 0) and ending in a
``BatchNormGradEpilogue`` (du = dz masked by the ReLU of x * scale + shift, du * scale stored,
per-tile sums of du and du * (x - mean)), stride phase by stride phase with zero-filled
phases writing zero rows; and the weight gradient reading dy through the prologue. Shifts
are positive, so a position outside dy transformed instead of kept 0 fails."""
import pytest
import torch

from fastarch.kernels.conv2d import ConvGeometry, InputNormalization
from fastarch.kernels.conv2d_tma import (tma_dgrad_launches, tma_dgrad_sum_rows,
                                         tma_gradient_supported)
from fastarch.kernels.conv2d_tma_wgrad import tma_wgrad_launch, tma_wgrad_supported
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.nhwc import BatchNormGradEpilogue, GradientPrologue
from fastarch.kernels.tensor_cores import Operand
from fastarch.testing import random_input, tolerance
from fold_reference import assert_dgrad_folds_match, signed_vectors, through_prologue64

# dtype id -> (dtype, operand, tolerance key)
DTYPES = {"bf16": (torch.bfloat16, Operand.SIXTEEN_BIT, torch.bfloat16),
          "tf32": (torch.float32, Operand.TF32, "tf32")}

TILE = TileConfig("test", 16, 16, 16, tma=True)

# name -> (x shape, K_out, kernel, stride, padding, dtype id, dx channels_last, launches:
# "tma" per phase a tap reaches, "zero" per zero fill). C = 24: a full and a ragged 16-wide
# channel tile in the epilogue.
DGRAD_CASES = {
    "3x3_p1": ((2, 24, 3, 5), 16, 3, 1, 1, "bf16", True, ["tma"]),
    "3x3_s2_p1": ((1, 24, 5, 6), 16, 3, 2, 1, "tf32", False, ["tma"] * 4),
    "1x1_s2": ((1, 24, 4, 5), 32, 1, 2, 0, "bf16", True, ["tma"] + ["zero"] * 3),
}


def _gradient_prologue(dy: torch.Tensor) -> GradientPrologue:
    y = random_input(tuple(dy.shape), dy.dtype, dy.device, channels_last=True)
    return GradientPrologue(y, *signed_vectors(dy.shape[1], dy.device))


def _label(launch) -> str:
    return "tma" if launch.name.startswith("conv2d_dgrad_tma[") else \
        "zero" if launch.name.startswith("conv2d_zero_fill[") else launch.name


# (folds, the epilogue's ReLU): both folds with and without it, each fold alone
FOLDS = {"both_relu": ("both", True), "both_affine": ("both", False),
         "prologue": ("prologue", False), "epilogue_relu": ("epilogue", True)}


@pytest.mark.parametrize("folds_id", FOLDS)
@pytest.mark.parametrize("case_id", DGRAD_CASES)
def test_tma_dgrad_folds_match_float64(case_id, folds_id, device):
    shape, k_out, kernel, stride, padding, dtype_id, channels_last, labels = \
        DGRAD_CASES[case_id]
    folds, relu = FOLDS[folds_id]
    dtype, operand, tolerance_key = DTYPES[dtype_id]
    N, C, H, W = shape
    geometry = ConvGeometry((kernel, kernel), (stride, stride), (padding, padding))
    P, Q = geometry.output_size(H, W)
    dy = random_input((N, k_out, P, Q), dtype, device, channels_last=True)
    weight = random_input((k_out, C, kernel, kernel), dtype, device)
    prologue = _gradient_prologue(dy) if folds != "epilogue" else None
    assert tma_gradient_supported(dy, operand, prologue)
    # x NCHW when dx is channels_last and the other way round: its own strides
    x = random_input(shape, dtype, device, channels_last=not channels_last)
    mean = torch.randn(C, device=device)
    normalization = InputNormalization(*signed_vectors(C, device), relu)
    rows = tma_dgrad_sum_rows(shape, geometry, TILE)
    sums = torch.full((rows, 2, C), float("nan"), device=device)
    epilogue = BatchNormGradEpilogue(x, mean, normalization, sums) if folds != "prologue" \
        else None
    dx = torch.full(shape, float("nan"), dtype=dtype, device=device)
    if channels_last:
        dx = dx.to(memory_format=torch.channels_last)
    launches = tma_dgrad_launches(dy, weight, dx, geometry, operand, TILE,
                                  grad_prologue=prologue, epilogue=epilogue)
    assert [_label(launch) for launch in launches] == labels
    for launch in launches:
        launch()

    assert_dgrad_folds_match(dx, dy, weight, stride, padding, prologue, epilogue,
                             tolerance_key)


def test_sum_rows_are_every_phase_tiles_and_a_row_a_zero_fill():
    """1x1 stride 2 on a 7 x 37 input, 16-pixel tiles: phase (0, 0) has 4 rows of 19 pixels
    (two tiles each: 8 rows), its three other phases no tap (one row each)."""
    geometry = ConvGeometry((1, 1), (2, 2))
    assert tma_dgrad_sum_rows((2, 16, 7, 37), geometry, TILE) == 2 * 8 + 3
    # stride 1: one phase, N * H * ceil(W / 16) tiles
    assert tma_dgrad_sum_rows((2, 16, 7, 37), ConvGeometry((3, 3), padding=(1, 1)),
                              TILE) == 2 * 7 * 3


def test_sums_of_another_row_count_are_a_value_error(device):
    """The kernels write rows 0 .. tma_dgrad_sum_rows - 1: sums of any other shape would be
    written past their end or left partly unwritten."""
    geometry = ConvGeometry((1, 1), (2, 2))
    dy = random_input((1, 16, 2, 3), torch.bfloat16, device, channels_last=True)
    dx = torch.empty((1, 16, 4, 5), dtype=torch.bfloat16, device=device)
    normalization = InputNormalization(*signed_vectors(16, device), True)
    rows = tma_dgrad_sum_rows(dx.shape, geometry, TILE)
    sums = torch.empty((rows - 1, 2, 16), device=device)
    epilogue = BatchNormGradEpilogue(dx, torch.zeros(16, device=device), normalization, sums)
    with pytest.raises(ValueError, match=f"are \\[{rows}, 2, 16\\]"):
        tma_dgrad_launches(dy, random_input((16, 16, 1, 1), torch.bfloat16, device), dx,
                           geometry, Operand.SIXTEEN_BIT, TILE, epilogue=epilogue)


def test_a_prologue_y_not_tma_ready_is_unsupported(device):
    """y is read through a descriptor of its own: it must be what dy must be."""
    dy = random_input((1, 16, 3, 3), torch.bfloat16, device, channels_last=True)
    prologue = _gradient_prologue(dy)
    nchw_y = prologue._replace(y=prologue.y.contiguous())
    assert tma_gradient_supported(dy, Operand.SIXTEEN_BIT, prologue)
    assert not tma_gradient_supported(dy, Operand.SIXTEEN_BIT, nchw_y)
    x = random_input((1, 16, 3, 3), torch.bfloat16, device, channels_last=True)
    geometry = ConvGeometry((1, 1))
    assert tma_wgrad_supported(x, dy, geometry, Operand.SIXTEEN_BIT, prologue)
    assert not tma_wgrad_supported(x, dy, geometry, Operand.SIXTEEN_BIT, nchw_y)


@pytest.mark.parametrize("dtype_id", DTYPES)
def test_tma_wgrad_gradient_prologue_matches_float64(dtype_id, device):
    """Q = 21 in 16-pixel steps (the last 5 wide: the prologue must keep the pixels past Q
    0), K_out = 24 (a ragged channel tile), two images of three rows in two splits of four
    rows; dW and db of dy + scale * y + shift, the NaN-filled partials summed here."""
    dtype, operand, tolerance_key = DTYPES[dtype_id]
    N, C, H, W, K = 2, 16, 3, 21, 24
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    x = random_input((N, C, H, W), dtype, device, channels_last=True)
    dy = random_input((N, K, H, W), dtype, device, channels_last=True)
    prologue = _gradient_prologue(dy)
    assert tma_wgrad_supported(x, dy, geometry, operand, prologue)
    out = torch.full((2, 3, 3, C, K), float("nan"), device=device)
    bias_out = torch.full((2, K), float("nan"), device=device)
    launch = tma_wgrad_launch(x, dy, out, bias_out, 2, 4, geometry, operand, TILE,
                              grad_prologue=prologue)
    assert launch.name.endswith(",grad_prologue]")
    launch()
    g = through_prologue64(dy, prologue)
    dw_ref = torch.nn.grad.conv2d_weight(x.cpu().double(), (K, C, 3, 3), g, padding=1)
    # fp32 partials of a GEMM of rounded operands: the operands' tolerance
    rtol, atol = tolerance(tolerance_key, N * H * W)
    torch.testing.assert_close(out.sum(0).permute(3, 2, 0, 1).double(), dw_ref, rtol=rtol,
                               atol=atol)
    torch.testing.assert_close(bias_out.sum(0).double(), g.sum((0, 2, 3)), rtol=rtol,
                               atol=atol)
