"""BatchNorm statistics of channels with a large mean and a small spread (mean 1e4, std 1),
with the interpreter's tile configs and with the GPU's (the launchers' own choice on a GPU,
forced here): every Welford merge (the BN kernel's lanes and tiles, the convolution's STATS
epilogue, the host merge of partials) must keep the mean to the fp32 rounding of 1e4 and
the variance to fp32 precision. Summing count * mean directly loses both at the GPU's tile
sizes (the mean was off by 3e-3 over 256-row tiles)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch.kernels.welford import merge_welford_partials
from fastarch.ops import batch_norm as bn_ops
from fastarch.ops import common as ops_common
from fastarch.ops import conv2d as conv_ops

LARGE_MEAN = 1e4
ULP = 2.0 ** -10  # fp32 spacing at 1e4 (9.8e-4)
# A mean is rounded to fp32 twice (a tile's, then the merged one), half an ulp each, plus what
# the averaged roundings of the values leave.
MEAN_TOLERANCE = 1.25 * ULP


def _as_on_a_gpu(choose):
    """``choose`` with its ``interpreter`` argument forced to False."""
    signature = inspect.signature(choose)

    def gpu_choice(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["interpreter"] = False
        return choose(*bound.args, **bound.kwargs)
    return gpu_choice


@pytest.fixture(params=["interpreter_configs", "gpu_configs"])
def tile_configs(request, monkeypatch) -> str:
    if request.param == "gpu_configs":
        # BatchNorm's tiles: its reduction and merge tiles, and the NHWC tile it shares.
        monkeypatch.setattr(bn_ops, "INTERPRETER", False)
        monkeypatch.setattr(ops_common, "INTERPRETER", False)
        monkeypatch.setattr(conv_ops, "forward_tile", _as_on_a_gpu(conv_ops.forward_tile))
    return request.param


def _large_mean_input(shape, device) -> torch.Tensor:
    return (LARGE_MEAN + torch.randn(shape)).to(device)


def test_batch_norm_statistics_of_a_large_mean(tile_configs, device):
    x = _large_mean_input((8, 3, 16, 16), device)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastarch.functional.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    x64 = x.cpu().double()
    mean64, var64 = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=True)
    assert (running_mean.cpu().double() - mean64).abs().max() <= MEAN_TOLERANCE
    assert ((running_var.cpu().double() - var64).abs() / var64).max() <= 1e-4
    # y's error is the mean's, times invstd ~ 1.
    torch.testing.assert_close(y.cpu().double(), F.batch_norm(x64, None, None, training=True),
                               rtol=1e-5, atol=MEAN_TOLERANCE)


def test_convolution_statistics_of_a_large_mean(tile_configs, device):
    """The STATS epilogue's per-tile mean and M2, then the host merge of its partials."""
    x = torch.randn(2, 8, 12, 12).to(device)
    weight = (torch.randn(16, 8, 3, 3) * 0.1).to(device)
    bias = torch.full((16,), LARGE_MEAN).to(device)
    _, partials = fastarch.functional.conv2d_fused(x, weight, bias, padding=1, stats=True)
    mean, var = merge_welford_partials(*partials)
    conv64 = F.conv2d(x.cpu().double(), weight.cpu().double(), bias.cpu().double(), padding=1)
    var64, mean64 = torch.var_mean(conv64, dim=(0, 2, 3), unbiased=False)
    assert (mean.cpu().double() - mean64).abs().max() <= MEAN_TOLERANCE
    assert ((var.cpu().double() - var64).abs() / var64).max() <= 1e-3  # TF32 off: fp32 dots


def test_host_merge_of_large_mean_partials():
    """Partials whose means differ by less than fp32 resolves at 1e4 times their counts."""
    values = LARGE_MEAN + torch.randn(300, 4, dtype=torch.float64)
    groups = values.split(7)
    count = torch.tensor([[len(g)] * 4 for g in groups], dtype=torch.float64)
    mean = torch.stack([g.mean(0) for g in groups])
    m2 = torch.stack([((g - g.mean(0)) ** 2).sum(0) for g in groups])
    merged_mean, var = merge_welford_partials(count.float(), mean.float(), m2.float())
    assert (merged_mean.double() - values.mean(0)).abs().max() <= MEAN_TOLERANCE
    torch.testing.assert_close(var.double(), values.var(0, unbiased=False), rtol=1e-4, atol=0)
