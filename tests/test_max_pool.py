"""MaxPool2d forward, backward and int64 indices against float64 torch, in the interpreter."""
import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend
from fastarch.kernels import max_pool
from fastarch.kernels.launch import TileConfig
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.testing import assert_close, assert_same_outcome, random_input
from layout_paths import PATH_CASES, assert_paths, path_input, recorded_launches
from pool_cases import MAX_POOL_CASES, layout_variants


def _reference(x: torch.Tensor, dy: torch.Tensor, kwargs: dict):
    leaf = x.detach().cpu().double().requires_grad_(True)
    y, indices = F.max_pool2d(leaf, return_indices=True, **kwargs)
    y.backward(dy.detach().cpu().double())
    return y.detach(), indices, leaf.grad


def _overlap(kwargs: dict) -> int:
    """How many windows one input element can belong to: the backward's reduction length."""
    kernel, stride = kwargs["kernel_size"], kwargs.get("stride") or kwargs["kernel_size"]
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    return -(-kernel[0] // stride[0]) * -(-kernel[1] // stride[1])


@pytest.mark.gpu_check
@pytest.mark.parametrize("case, dtype, channels_last", layout_variants(MAX_POOL_CASES))
def test_max_pool2d_matches_torch(case, dtype, channels_last, device):
    shape, kwargs = case
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    y, indices = fastarch.functional.max_pool2d(x, return_indices=True, **kwargs)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)
    y_ref, indices_ref, dx_ref = _reference(x, dy, kwargs)

    assert y.dtype == dtype and indices.dtype == torch.int64
    assert torch.equal(y.cpu().double(), y_ref), "the max of a window is exact"
    assert torch.equal(indices.cpu(), indices_ref)
    assert_close(x.grad, dx_ref, dtype, _overlap(kwargs), name="grad input")
    expect_channels_last = channels_last and shape[1] > 1
    assert y.is_contiguous(memory_format=torch.channels_last) == expect_channels_last
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == expect_channels_last


def test_nan_propagates_like_torch(device):
    x = random_input((2, 3, 6, 6), torch.float32, device, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 1, 1] = float("nan")
        x[1, 2, 4, 3] = float("nan")
        x[1, 2, 5, 2] = float("nan")  # two NaNs in one 3x3 window: torch keeps the last
    y, indices = fastarch.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    y.backward(torch.ones_like(y))
    y_ref, indices_ref, dx_ref = _reference(x, torch.ones_like(y), dict(kernel_size=3, stride=2,
                                                                       padding=1))
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y_ref))
    assert torch.isnan(y).any()
    assert torch.equal(indices.cpu(), indices_ref)
    assert torch.equal(x.grad.cpu().double(), dx_ref)


def test_all_negative_infinity_window_points_at_its_first_element(device):
    x = torch.full((1, 2, 4, 4), float("-inf"), device=device)
    y, indices = fastarch.functional.max_pool2d(x, 2, return_indices=True)
    _, indices_ref = F.max_pool2d(x.cpu(), 2, return_indices=True)
    assert torch.equal(indices.cpu(), indices_ref)
    assert torch.isneginf(y).all()


def test_backward_is_bitwise_deterministic(device):
    x = random_input((2, 16, 13, 13), torch.bfloat16, device, channels_last=True,
                     requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        y = fastarch.functional.max_pool2d(x, 3, 2)
        y.backward(torch.ones_like(y))
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_unbatched_and_strided_input(device):
    base = random_input((4, 12, 10), torch.float32, device)
    x = base[::2, 1:, ::1].requires_grad_(True)  # 3-D and not contiguous
    y = fastarch.functional.max_pool2d(x, 2, 2)
    y.backward(torch.ones_like(y))
    y_ref, _, dx_ref = _reference(x.unsqueeze(0), torch.ones_like(y).unsqueeze(0),
                                  dict(kernel_size=2, stride=2))
    assert torch.equal(y.cpu().double(), y_ref.squeeze(0))
    assert torch.equal(x.grad.cpu().double(), dx_ref.squeeze(0))


def test_inference_skips_offsets_and_empty_batch_works(device):
    x = random_input((0, 3, 6, 6), torch.float32, device)
    assert fastarch.functional.max_pool2d(x, 2).shape == (0, 3, 3, 3)
    with torch.no_grad():
        x = random_input((1, 3, 6, 6), torch.float32, device, requires_grad=True)
        y = fastarch.functional.max_pool2d(x, 2)
    assert y.grad_fn is None
    assert torch.equal(y.cpu(), F.max_pool2d(x.detach().cpu(), 2))


def test_module_matches_torch_nn(device):
    ours = fastarch.nn.MaxPool2d(3, stride=2, padding=1, dilation=1, return_indices=True,
                                 ceil_mode=True)
    theirs = torch.nn.MaxPool2d(3, stride=2, padding=1, dilation=1, return_indices=True,
                                ceil_mode=True)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    x = random_input((2, 3, 9, 9), torch.float32, device)
    for a, b in zip(ours(x), theirs(x.cpu())):
        assert torch.equal(a.cpu(), b)


BAD_INPUTS = {
    "2d": ((5, 5), torch.float32, dict(kernel_size=2), "3D or 4D"),
    "5d": ((1, 1, 2, 5, 5), torch.float32, dict(kernel_size=2), "3D or 4D"),
    "zero_channels": ((1, 0, 5, 5), torch.float32, dict(kernel_size=2), "non-empty"),
    "padding_too_big": ((1, 2, 5, 5), torch.float32, dict(kernel_size=2, padding=2),
                        "pad should be at most half"),
    "output_too_small": ((1, 2, 5, 5), torch.float32, dict(kernel_size=7), "too small"),
    "stride_zero": ((1, 2, 5, 5), torch.float32, dict(kernel_size=2, stride=0), "stride"),
    "dilation_zero": ((1, 2, 5, 5), torch.float32, dict(kernel_size=2, dilation=0), "dilation"),
    "kernel_three_ints": ((1, 2, 5, 5), torch.float32, dict(kernel_size=(2, 2, 2)),
                          "kernel_size"),
}


@pytest.mark.parametrize("shape, dtype, kwargs, message", BAD_INPUTS.values(),
                         ids=BAD_INPUTS.keys())
def test_bad_input_raises_what_torch_raises(shape, dtype, kwargs, message, device):
    with pytest.raises(Exception) as theirs:
        F.max_pool2d(torch.randn(shape), **kwargs)
    with pytest.raises(theirs.type, match=message):
        fastarch.functional.max_pool2d(torch.randn(shape, device=device), **kwargs)


@pytest.mark.torch_fallback
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_input_runs_torchs_pool_and_is_counted(dtype, device):
    x = torch.randint(-4, 5, (1, 2, 4, 4), device=device).to(dtype)
    before = backend.fallback_counts["max_pool2d"]
    assert_same_outcome(lambda: fastarch.functional.max_pool2d(x, 2, return_indices=True),
                        lambda: F.max_pool2d(x, 2, return_indices=True))  # bool: raises
    assert backend.fallback_counts["max_pool2d"] == before + 1


@pytest.mark.parametrize("channels, layout", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_dense_and_strided_paths_match_torch(channels, layout, device):
    kwargs = dict(kernel_size=3, stride=2, padding=1)
    x = path_input((2, channels, 5, 6), layout, device, requires_grad=True)
    with recorded_launches() as launches:
        y, indices = fastarch.functional.max_pool2d(x, return_indices=True, **kwargs)
        dy = path_input(y.shape, layout, device)
        y.backward(dy)
    assert_paths(launches, channels, layout)
    y_ref, indices_ref, dx_ref = _reference(x, dy, kwargs)
    assert torch.equal(y.cpu().double(), y_ref)
    assert torch.equal(indices.cpu(), indices_ref)
    assert_close(x.grad, dx_ref, torch.float32, _overlap(kwargs), name="grad input")


def test_dense_path_needs_tile_offsets_in_int32():
    """A tensor past 2^31 elements takes the dense path (a tile's origin is int64), one whose
    tile reaches 2^31 elements past its origin (an image of 2^30, a tile over two) does not."""
    tile = TileConfig("c64", block_m=64, block_n=64)

    def dense(N, C, H, W):
        x = torch.empty((N, C, H, W), device="meta", memory_format=torch.channels_last)
        y = torch.empty((N, C, H // 2, W // 2), device="meta", memory_format=torch.channels_last)
        launch = max_pool.forward_launch(x, y, None, None, PoolGeometry((2, 2), (2, 2), (0, 0)),
                                         tile)
        return launch.constexprs["DENSE_NHWC"]

    assert dense(4096, 64, 128, 128)
    assert not dense(2, 64, 4096, 4096)
