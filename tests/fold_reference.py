"""What the backward-fold kernel tests share: per-channel vectors, the float64 gradient a
gradient prologue reads (``nhwc.GradientPrologue``), what a BatchNorm epilogue makes of dz
(``nhwc.BatchNormGradEpilogue``), and the check of a folded dgrad against them."""
from __future__ import annotations

import torch

from fastarch.kernels.nhwc import BatchNormGradEpilogue, GradientPrologue
from fastarch.testing import assert_close, tolerance


def signed_vectors(channels: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) fp32 [channels]: scales of both signs in [0.5, 1) read at a stride of
    2, shifts in [0.25, 0.75) (nonzero: a padding element through a transform shows)."""
    magnitude = torch.rand(2 * channels, device=device) * 0.5 + 0.5
    sign = torch.randint(0, 2, (2 * channels,), device=device) * 2 - 1
    shift = torch.rand(channels, device=device) * 0.5 + 0.25
    return (magnitude * sign)[::2], shift


def through_prologue64(dy: torch.Tensor, prologue: GradientPrologue | None) -> torch.Tensor:
    """dy + scale * y + shift in float64 on the CPU (dy itself without a prologue)."""
    dy64 = dy.cpu().double()
    if prologue is None:
        return dy64
    view = (1, -1, 1, 1)
    return (dy64 + prologue.scale.cpu().double().view(view) * prologue.y.cpu().double()
            + prologue.shift.cpu().double().view(view))


def batch_norm_grad64(dz: torch.Tensor, epilogue: BatchNormGradEpilogue
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a dgrad's ``epilogue`` makes of dz, in float64: (du * scale, [du.sum,
    (du * (x - mean)).sum] per channel), du being dz zeroed where x * scale + shift <= 0
    when the epilogue's normalization has a ReLU (torch's threshold_backward: NaN passes)."""
    view = (1, -1, 1, 1)
    x = epilogue.x.cpu().double()
    scale = epilogue.normalization.scale.cpu().double().view(view)
    du = dz
    if epilogue.normalization.relu:
        pre_activation = x * scale + epilogue.normalization.shift.cpu().double().view(view)
        du = dz.masked_fill(pre_activation <= 0, 0)
    centered = x - epilogue.mean.cpu().double().view(view)
    return du * scale, torch.stack((du.sum((0, 2, 3)), (du * centered).sum((0, 2, 3))))


def assert_dgrad_folds_match(dx: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor,
                             stride: int, padding: int, grad_prologue: GradientPrologue | None,
                             epilogue: BatchNormGradEpilogue | None, key) -> None:
    """dx (and the epilogue's sum rows) of a dgrad launched with ``grad_prologue`` and
    ``epilogue`` (either None) against float64: dz, the input gradient of dy read through the
    prologue, then what the epilogue makes of it (``batch_norm_grad64``). ``key``: the
    tolerance's dtype or mode."""
    dz = torch.nn.grad.conv2d_input(dx.shape, weight.cpu().double(),
                                    through_prologue64(dy, grad_prologue), stride=stride,
                                    padding=padding)
    taps = weight.shape[0] * weight.shape[2] * weight.shape[3]
    if epilogue is None:
        assert_close(dx, dz, key, taps, "dx")
        return
    dx_ref, sums_ref = batch_norm_grad64(dz, epilogue)
    assert_close(dx, dx_ref, key, taps, "dx")
    # fp32 sums of a dgrad of rounded operands: the operands' tolerance over the whole reduction
    N, _, H, W = dx.shape
    rtol, atol = tolerance(key, N * H * W * taps)
    torch.testing.assert_close(epilogue.sums.sum(0).double(), sums_ref, rtol=rtol, atol=atol)
