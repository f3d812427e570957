"""AvgPool2d and AdaptiveAvgPool2d forward and backward against float64 torch."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend
from fastarch.testing import assert_close, assert_same_outcome, random_input, reference_grads
from layout_paths import PATH_CASES, assert_paths, path_input, recorded_launches
from pool_cases import ADAPTIVE_CASES, AVG_POOL_CASES, layout_variants


def _window_taps(kwargs: dict) -> int:
    kernel = kwargs["kernel_size"]
    return math.prod(kernel) if isinstance(kernel, tuple) else kernel * kernel


@pytest.mark.gpu_check
@pytest.mark.parametrize("case, dtype, channels_last", layout_variants(AVG_POOL_CASES))
def test_avg_pool2d_matches_torch(case, dtype, channels_last, device):
    shape, kwargs = case
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    y = fastarch.functional.avg_pool2d(x, **kwargs)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)
    y_ref, (dx_ref,) = reference_grads(lambda t: F.avg_pool2d(t, **kwargs), [x], dy)
    taps = _window_taps(kwargs)
    assert_close(y, y_ref, dtype, taps, name="output")
    assert_close(x.grad, dx_ref, dtype, taps, name="grad input")
    expect_channels_last = channels_last and shape[1] > 1
    assert y.is_contiguous(memory_format=torch.channels_last) == expect_channels_last
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == expect_channels_last


@pytest.mark.gpu_check
@pytest.mark.parametrize("case, dtype, channels_last", layout_variants(ADAPTIVE_CASES))
def test_adaptive_avg_pool2d_matches_torch(case, dtype, channels_last, device):
    shape, output_size = case
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    y = fastarch.functional.adaptive_avg_pool2d(x, output_size)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)
    y_ref, (dx_ref,) = reference_grads(lambda t: F.adaptive_avg_pool2d(t, output_size), [x], dy)
    taps = math.ceil(shape[2] / y.shape[2] + 1) * math.ceil(shape[3] / y.shape[3] + 1)
    assert_close(y, y_ref, dtype, taps, name="output")
    assert_close(x.grad, dx_ref, dtype, taps, name="grad input")


def test_adaptive_identity_fast_path_returns_the_input(device):
    x = random_input((2, 4, 6, 6), torch.bfloat16, device, channels_last=True)
    assert fastarch.functional.adaptive_avg_pool2d(x, (6, 6)) is x
    assert fastarch.functional.adaptive_avg_pool2d(x, (None, 6)) is x


def test_adaptive_zero_output_size_gives_empty(device):
    x = random_input((2, 4, 6, 6), torch.float32, device)
    assert fastarch.functional.adaptive_avg_pool2d(x, (0, 3)).shape == (2, 4, 0, 3)


def test_unbatched_input(device):
    x = random_input((3, 7, 8), torch.float32, device, requires_grad=True)
    y = fastarch.functional.avg_pool2d(x, 3, 2, 1)
    z = fastarch.functional.adaptive_avg_pool2d(x, 3)
    (y.sum() + z.sum()).backward()
    _, (dx_ref,) = reference_grads(
        lambda t: F.avg_pool2d(t, 3, 2, 1).sum() + F.adaptive_avg_pool2d(t, 3).sum(), [x],
        torch.tensor(1.0))
    assert y.shape == (3, 4, 4) and z.shape == (3, 3, 3)
    assert_close(x.grad, dx_ref, torch.float32, 9, name="grad input")


def test_backward_is_bitwise_deterministic(device):
    x = random_input((2, 16, 13, 13), torch.bfloat16, device, True, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        (fastarch.functional.avg_pool2d(x, 3, 2).sum()
         + fastarch.functional.adaptive_avg_pool2d(x, 6).sum()).backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_modules_match_torch_nn(device):
    pairs = [
        (fastarch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                               divisor_override=4),
         torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                            divisor_override=4)),
        (fastarch.nn.AdaptiveAvgPool2d((6, None)), torch.nn.AdaptiveAvgPool2d((6, None))),
    ]
    x = random_input((2, 3, 13, 11), torch.float32, device)
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert repr(ours) == repr(theirs)
        assert ours.state_dict() == theirs.state_dict() == {}
        assert_close(ours(x), theirs(x.cpu().double()), torch.float32, 9)


AVG_BAD_INPUTS = {
    "2d": ((5, 5), dict(kernel_size=2), "3D or 4D"),
    "5d": ((1, 1, 2, 5, 5), dict(kernel_size=2), "3D or 4D"),
    "padding_too_big": ((1, 2, 5, 5), dict(kernel_size=2, padding=2), "pad should be at most"),
    "output_too_small": ((1, 2, 5, 5), dict(kernel_size=7), "too small"),
    "stride_zero": ((1, 2, 5, 5), dict(kernel_size=2, stride=0), "stride"),
    "divisor_zero": ((1, 2, 5, 5), dict(kernel_size=2, divisor_override=0), "divisor"),
}


@pytest.mark.parametrize("shape, kwargs, message", AVG_BAD_INPUTS.values(),
                         ids=AVG_BAD_INPUTS.keys())
def test_avg_bad_input_raises_what_torch_raises(shape, kwargs, message, device):
    with pytest.raises(Exception) as theirs:
        F.avg_pool2d(torch.randn(shape), **kwargs)
    with pytest.raises(theirs.type, match=message):
        fastarch.functional.avg_pool2d(torch.randn(shape, device=device), **kwargs)


ADAPTIVE_BAD_INPUTS = {
    "2d": ((5, 5), (2, 2), "3D or 4D"),
    "2d_int_size": ((5, 5), 2, "3D or 4D"),
    "3d_three_sizes": ((2, 5, 5), (2, 2, 2), "3D or 4D"),
    "negative_size": ((1, 2, 5, 5), (-1, 2), "greater than or equal to 0"),
    "three_sizes": ((1, 2, 5, 5), (2, 2, 2), "output_size must be 2"),
    "zero_width_input": ((1, 2, 5, 0), (2, 2), "non-zero size"),
}


@pytest.mark.parametrize("shape, output_size, message", ADAPTIVE_BAD_INPUTS.values(),
                         ids=ADAPTIVE_BAD_INPUTS.keys())
def test_adaptive_bad_input_raises_what_torch_raises(shape, output_size, message, device):
    with pytest.raises(Exception) as theirs:
        F.adaptive_avg_pool2d(torch.randn(shape), output_size)
    with pytest.raises(theirs.type, match=message):
        fastarch.functional.adaptive_avg_pool2d(torch.randn(shape, device=device), output_size)


@pytest.mark.torch_fallback
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("op, size", [("avg_pool2d", 2), ("adaptive_avg_pool2d", 2),
                                      ("adaptive_avg_pool2d", 4)],
                         ids=["avg_pool2d", "adaptive_avg_pool2d", "adaptive_identity"])
def test_integer_input_runs_torchs_pool_and_is_counted(op, size, dtype, device):
    """torch's answer (int64 average pooling on the CPU) or its NotImplementedError, even
    where the adaptive pool would be the identity."""
    x = torch.randint(-4, 5, (1, 2, 4, 4), device=device, dtype=dtype)
    before = backend.fallback_counts[op]
    assert_same_outcome(lambda: getattr(fastarch.functional, op)(x, size),
                        lambda: getattr(F, op)(x, size))
    assert backend.fallback_counts[op] == before + 1


@pytest.mark.parametrize("shape", [(1, 0, 5, 5), (0, 5, 5), (0, 0, 5, 5)])
def test_adaptive_empty_batch_or_channels_gives_torchs_empty_result(shape, device):
    x = torch.randn(shape, device=device)
    assert fastarch.functional.adaptive_avg_pool2d(x, 2).shape == \
        F.adaptive_avg_pool2d(x.cpu(), 2).shape


@pytest.mark.parametrize("channels, layout", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_dense_and_strided_paths_match_torch(channels, layout, device):
    x = path_input((2, channels, 5, 6), layout, device, requires_grad=True)
    with recorded_launches() as launches:
        y = fastarch.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        z = fastarch.functional.adaptive_avg_pool2d(x, (2, 4))
        dy, dz = path_input(y.shape, layout, device), path_input(z.shape, layout, device)
        torch.autograd.backward([y, z], [dy, dz])
    assert_paths(launches, channels, layout)
    leaf = x.detach().cpu().double().requires_grad_(True)
    y_ref = F.avg_pool2d(leaf, 3, 2, 1, count_include_pad=False)
    z_ref = F.adaptive_avg_pool2d(leaf, (2, 4))
    torch.autograd.backward([y_ref, z_ref], [dy.cpu().double(), dz.cpu().double()])
    assert_close(y, y_ref, torch.float32, 9, name="avg output")
    assert_close(z, z_ref, torch.float32, 12, name="adaptive output")
    assert_close(x.grad, leaf.grad, torch.float32, 9, name="grad input")
