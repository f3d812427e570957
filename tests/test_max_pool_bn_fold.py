"""The max pool's backward with BatchNorm's backward folded in (``max_pool.PoolGradFold``),
launched directly against float64 torch: the gathered dz of relu?((x - mean) * scale +
shift) zeroed where the ReLU was off, du * scale stored as dx, and the per-row sums of du
and du * (x - mean), summed here in row order. The window offsets come from torch's indices,
so the backward is checked alone; one test runs the forward first, on inputs at the ReLU's
edge, to check that the mask is the forward's own. dx and every sum row are NaN-filled
first, so an element or row left unwritten fails. Tiles of 64 pixels by 4 channels: several
programs along both axes, C = 5 leaving a ragged channel block."""
import pytest
import torch
import torch.nn.functional as F

from fastarch.kernels import max_pool
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.testing import assert_close, random_input, tolerance

TILE = TileConfig("test", 64, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> (x shape, kernel, stride, padding, dx channels_last, x channels_last, dtype id)
CASES = {
    "2x2_s2_c5_nhwc_bf16": ((2, 5, 8, 7), 2, 2, 0, True, True, "bf16"),
    "2x2_s2_p1_c5_nchw_fp32": ((2, 5, 7, 8), 2, 2, 1, False, False, "fp32"),
    "3x3_s2_p1_c5_nhwc_fp32": ((2, 5, 9, 9), 3, 2, 1, True, True, "fp32"),
    "3x3_s2_p1_c5_nchw_bf16": ((1, 5, 9, 10), 3, 2, 1, False, False, "bf16"),
    # x in the other memory format than dx: its own strides, the strided path.
    "3x3_s2_p1_c5_x_nchw_dx_nhwc_fp32": ((1, 5, 9, 8), 3, 2, 1, True, False, "fp32"),
}


def _nan(shape, dtype, device, channels_last=False) -> torch.Tensor:
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return out.to(memory_format=torch.channels_last) if channels_last else out


def _normalization(channels: int, device: str) -> tuple[torch.Tensor, ...]:
    """(mean, scale, shift) dense fp32 [channels]: scales of both signs in [0.5, 1)."""
    mean = torch.randn(channels)
    scale = (torch.rand(channels) * 0.5 + 0.5) * (torch.randint(0, 2, (channels,)) * 2 - 1)
    shift = torch.randn(channels) * 0.5
    return tuple(t.to(device) for t in (mean, scale, shift))


def _pre_activation64(x: torch.Tensor, normalization) -> torch.Tensor:
    """(x - mean) * scale + shift in float64 on the CPU."""
    mean, scale, shift = (t.cpu().double().view(1, -1, 1, 1) for t in normalization)
    return (x.cpu().double() - mean) * scale + shift


def _pool_reference(x: torch.Tensor, normalization, relu: bool, dy: torch.Tensor,
                    geometry: PoolGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch's int64 indices of the pool of relu?(normalised x), dz) in float64."""
    z_pre = _pre_activation64(x, normalization)
    z = (z_pre.relu() if relu else z_pre).requires_grad_(True)
    y, indices = F.max_pool2d(z, geometry.kernel, geometry.stride, geometry.padding,
                              return_indices=True)
    y.backward(dy.cpu().double())
    return indices, z.grad


def _window_offsets(indices: torch.Tensor, geometry: PoolGeometry, width: int
                    ) -> torch.Tensor:
    """torch's flat h * W + w indices as the forward's window offsets kh * KW + kw (int8)."""
    P, Q = indices.shape[2:]
    (SH, SW), (PH, PW), KW = geometry.stride, geometry.padding, geometry.kernel[1]
    kh = indices // width - (torch.arange(P).view(-1, 1) * SH - PH)
    kw = indices % width - (torch.arange(Q) * SW - PW)
    return (kh * KW + kw).to(torch.int8)


def _folded_grads64(dz: torch.Tensor, x: torch.Tensor, normalization, relu: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(du * scale, [du.sum, (du * (x - mean)).sum] per channel) in float64."""
    mean, scale, _ = (t.cpu().double().view(1, -1, 1, 1) for t in normalization)
    du = dz.masked_fill(_pre_activation64(x, normalization) <= 0, 0) if relu else dz
    centered = x.cpu().double() - mean
    return du * scale, torch.stack((du.sum((0, 2, 3)), (du * centered).sum((0, 2, 3))))


def _fold(x: torch.Tensor, normalization, relu: bool) -> max_pool.PoolGradFold:
    rows = max_pool.backward_sum_rows(x.shape, TILE)
    sums = _nan((rows, 2, x.shape[1]), torch.float32, x.device)
    return max_pool.PoolGradFold(x, normalization, relu, sums)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("case_id", CASES)
def test_folded_backward_matches_float64(case_id, relu, device):
    shape, kernel, stride, padding, channels_last, x_channels_last, dtype_id = CASES[case_id]
    dtype = DTYPES[dtype_id]
    N, C, H, W = shape
    geometry = PoolGeometry((kernel, kernel), (stride, stride), (padding, padding))
    P, Q = geometry.output_size(H, W)
    x = random_input(shape, dtype, device, channels_last=x_channels_last)
    normalization = _normalization(C, device)
    dy = random_input((N, C, P, Q), dtype, device, channels_last=channels_last)
    indices, dz = _pool_reference(x, normalization, relu, dy, geometry)
    offsets = _window_offsets(indices, geometry, W).to(device)
    if channels_last:
        offsets = offsets.to(memory_format=torch.channels_last)
    dx = _nan(shape, dtype, device, channels_last)
    fold = _fold(x, normalization, relu)
    launch = max_pool.backward_launch(dy, offsets, dx, geometry, TILE, fold=fold)
    assert launch.grid == (fold.sums.shape[0], 2)
    launch()
    dx_ref, sums_ref = _folded_grads64(dz, x, normalization, relu)
    overlap = ((kernel + stride - 1) // stride) ** 2  # the windows an element can be in
    assert_close(dx, dx_ref, dtype, overlap, "dx")
    # fp32 sums of fp32 terms (x and dy are exact in fp32, whatever their dtype).
    rtol, atol = tolerance(torch.float32, N * H * W * overlap)
    torch.testing.assert_close(fold.sums.sum(0).double(), sums_ref, rtol=rtol, atol=atol)


def test_relu_mask_is_the_forwards_own(device):
    """x within a few hundred ulps of the ReLU's threshold mean - shift / scale, set near 0,
    where (x - mean) * scale + shift is mostly fp32 rounding: other arithmetic (float64, or
    x * scale + (shift - mean * scale)) takes other signs. A 1x1 window makes every element
    its window's maximum; with dy = 1, du is 1 exactly where the forward kept a value above
    0. C = 4: whole channel blocks."""
    N, C, H, W = 2, 4, 8, 8
    geometry = PoolGeometry((1, 1), (1, 1), (0, 0))
    _, scale, shift = _normalization(C, "cpu")
    mean = (torch.randn(C).double() * 0.01 + shift.double() / scale.double()).float()
    threshold = (mean.double() - shift.double() / scale.double()).view(1, -1, 1, 1)
    ulps = torch.randint(-256, 257, (N, C, H, W)).double() * threshold.abs() * 2.0**-23
    x = (threshold + ulps).float()
    z_pre32 = (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert ((_pre_activation64(x, (mean, scale, shift)) > 0) != (z_pre32 > 0)).any()
    x = x.to(device=device, memory_format=torch.channels_last)
    normalization = tuple(t.to(device) for t in (mean, scale, shift))
    y = _nan((N, C, H, W), torch.float32, device, channels_last=True)
    offsets = torch.empty((N, C, H, W), dtype=torch.int8, device=device,
                          memory_format=torch.channels_last)
    max_pool.forward_launch(x, y, offsets, None, geometry, TILE, normalization, relu=True)()
    dx = _nan((N, C, H, W), torch.float32, device, channels_last=True)
    fold = _fold(x, normalization, True)
    max_pool.backward_launch(torch.ones_like(y), offsets, dx, geometry, TILE, fold=fold)()
    kept = y > 0
    assert 0 < kept.sum() < y.numel()
    assert torch.equal(dx != 0, kept)
    assert torch.equal(fold.sums.sum(0)[0], kept.sum((0, 2, 3)).float())


def test_launch_names_mark_the_fold(device):
    """The ledger tells the folded launches apart by name; without a fold, the name and the
    tensor arguments stay as they were."""
    geometry = PoolGeometry((2, 2), (2, 2), (0, 0))
    x = random_input((1, 5, 4, 4), torch.float32, device)
    dy = random_input((1, 5, 2, 2), torch.float32, device)
    offsets = torch.zeros((1, 5, 2, 2), dtype=torch.int8, device=device)
    dx = _nan((1, 5, 4, 4), torch.float32, device)
    normalization = _normalization(5, device)
    launches = [max_pool.backward_launch(dy, offsets, dx, geometry, TILE, fold=fold)
                for fold in (None, _fold(x, normalization, False),
                             _fold(x, normalization, True))]
    assert [launch.name for launch in launches] == [
        "max_pool2d_backward[test]", "max_pool2d_backward[test+bn_grad]",
        "max_pool2d_backward[test+bn_grad_relu]"]
    assert {name for name, t in launches[0].args.items() if isinstance(t, torch.Tensor)} == {
        "dx_ptr", "dy_ptr", "offset_ptr"}
