"""Every tensor argument is checked at the launch boundary (``kernels.launch``): the unusual
but legal arguments of issue 11 against float64 torch or torch's exception type, the guard's
own refusals, and every launcher run on views into larger storages filled with a sentinel
(NaN, or the most negative integer), so a read outside a view shows in a result and a write
outside it in the storage."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import triton

import fastarch
import fastarch.functional as FF
from fastarch import fusion
from fastarch.compile_report import all_launches
from fastarch.kernels import avg_pool, conv2d, conv2d_backward
from fastarch.kernels import batch_norm as bn
from fastarch.kernels import dropout as dropout_kernels
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels import max_pool, relu
from fastarch.kernels.conv2d import ConvGeometry
from fastarch.kernels.launch import Launch, LaunchArgumentError, dense
from fastarch.kernels.pool_geometry import PoolGeometry
from fastarch.kernels.tensor_cores import Operand
from fastarch.kernels.welford import merge_welford_partials
from fastarch.ops.common import nhwc_tile
from fastarch.ops import batch_norm as bn_ops
from fastarch.ops import conv2d as conv_ops
from fastarch.ops import dropout as dropout_ops
from fastarch.ops import linear as linear_ops
from fastarch.ops.relu import relu_tile
from fastarch.testing import assert_close, random_input

FP32 = torch.float32


def _raises_like_torch(ours: Callable[[], object], theirs: Callable[[], object]) -> str:
    """Our call raises the exception type torch's raises; returns our message."""
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(expected.type) as raised:
        ours()
    return str(raised.value)


# ----------------------------------------------------------------------------- bias strides

# A vector of 4 values that is not dense: every other element, and one value expanded.
STRIDED_LEAVES = {
    "every_other": (lambda device: torch.arange(8.0, device=device), lambda t: t[::2]),
    "expanded": (lambda device: torch.tensor(3.0, device=device), lambda t: t.expand(4)),
}


def _strided_leaf(case: str, device: str, dtype: torch.dtype = FP32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf that requires grad, the strided 4-vector view of it)."""
    make, view = STRIDED_LEAVES[case]
    leaf = make(device).to(dtype).requires_grad_(True)
    return leaf, view(leaf)


@pytest.mark.parametrize("case", STRIDED_LEAVES)
def test_conv2d_bias_of_any_stride(case, device):
    x = random_input((1, 3, 4, 4), FP32, device)
    w = random_input((4, 3, 3, 3), FP32, device)
    leaf, bias = _strided_leaf(case, device)
    y = FF.conv2d(x, w, bias)
    dy = random_input(y.shape, FP32, device)
    y.backward(dy)
    leaf64, bias64 = _strided_leaf(case, "cpu", torch.float64)
    y_ref = F.conv2d(x.double().cpu(), w.double().cpu(), bias64)
    y_ref.backward(dy.double().cpu())
    assert_close(y, y_ref, FP32, 27)
    assert_close(leaf.grad, leaf64.grad, FP32, 16, name="bias leaf grad")


@pytest.mark.parametrize("case", STRIDED_LEAVES)
def test_fused_conv_relu_bias_and_scale_shift_of_any_stride(case, device):
    x = random_input((1, 3, 4, 4), FP32, device)
    w = random_input((4, 3, 3, 3), FP32, device)
    _, vector = _strided_leaf(case, device)
    vector = vector.detach()
    conv = F.conv2d(x.double().cpu(), w.double().cpu())
    vector64 = vector.double().cpu()
    y, _ = FF.conv2d_fused(x, w, vector, relu=True)
    assert_close(y, torch.relu(conv + vector64.view(1, -1, 1, 1)), FP32, 27)
    y, _ = FF.conv2d_fused(x, w, None, scale=vector, shift=vector)
    channel = vector64.view(1, -1, 1, 1)
    assert_close(y, conv * channel + channel, FP32, 27)
    conv_relu = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).to(device)
    with torch.no_grad():
        conv_relu[0].weight.copy_(w)
    conv_relu[0].bias = torch.nn.Parameter(vector)
    assert conv_relu[0].bias.stride() == vector.stride()
    assert fusion.fused_runs(conv_relu)
    assert_close(fusion.fuse(conv_relu)(x), torch.relu(conv + channel), FP32, 27,
                 name="fused Conv2d -> ReLU")


@pytest.mark.parametrize("case", STRIDED_LEAVES)
def test_linear_bias_of_any_stride(case, device):
    x = random_input((3, 5), FP32, device)
    w = random_input((4, 5), FP32, device)
    leaf, bias = _strided_leaf(case, device)
    y = FF.linear(x, w, bias)
    y.backward(torch.ones_like(y))
    leaf64, bias64 = _strided_leaf(case, "cpu", torch.float64)
    y_ref = F.linear(x.double().cpu(), w.double().cpu(), bias64)
    y_ref.sum().backward()
    assert_close(y, y_ref, FP32, 5)
    assert_close(leaf.grad, leaf64.grad, FP32, 12, name="bias leaf grad")


# ----------------------------------------------------------------------------- batch norm

def _running(device: str, shape=(3,), dtype=FP32) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(shape, dtype=dtype, device=device),
            torch.ones(shape, dtype=dtype, device=device))


BAD_RUNNING_STATISTICS = {
    "shape_1_by_c": dict(shape=(1, 3)),
    "shape_c_by_1": dict(shape=(3, 1)),
    "int64": dict(dtype=torch.int64),
    "float64": dict(dtype=torch.float64),
    "float16": dict(dtype=torch.float16),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", BAD_RUNNING_STATISTICS)
def test_bad_running_statistics_raise_before_anything_is_written(case, training, device):
    x = random_input((2, 3, 4, 4), FP32, device)
    mean, var = _running(device, **BAD_RUNNING_STATISTICS[case])
    cpu_mean, cpu_var = _running("cpu", **BAD_RUNNING_STATISTICS[case])
    _raises_like_torch(lambda: FF.batch_norm(x, mean, var, training=training),
                       lambda: F.batch_norm(x.cpu(), cpu_mean, cpu_var, training=training))
    assert (mean == 0).all() and (var == 1).all()


def test_running_statistics_bf16_input_float32_parameters_are_accepted(device):
    """torch's one mixed-dtype rule: a half-precision input with every parameter float32."""
    x = random_input((2, 3, 4, 4), torch.bfloat16, device)
    mean, var = _running(device)
    weight = random_input((3,), FP32, device)
    y = FF.batch_norm(x, mean, var, weight, None, training=True)
    ref_mean, ref_var = _running("cpu", dtype=torch.float64)
    y_ref = F.batch_norm(x.double().cpu(), ref_mean, ref_var, weight.double().cpu(), None,
                         training=True)
    assert_close(y, y_ref, torch.bfloat16, 32)
    assert_close(mean, ref_mean, FP32, 32, name="running_mean")
    _raises_like_torch(
        lambda: FF.batch_norm(x, mean, var, weight.bfloat16(), None, training=True),
        lambda: F.batch_norm(x.cpu(), mean.cpu(), var.cpu(), weight.bfloat16().cpu(), None,
                             training=True))


def test_strided_running_statistics_weight_and_bias(device):
    """Every other element of larger buffers: updated in place through their strides, the
    elements between them untouched."""
    x = random_input((2, 3, 4, 4), FP32, device)
    buffers = [random_input((6,), FP32, device).abs() + 0.5 for _ in range(4)]
    reference = [b.double().cpu() for b in buffers]
    mean, var, weight, bias = (b[::2] for b in buffers)
    y = FF.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.3)
    ref_mean, ref_var, ref_weight, ref_bias = (b[::2] for b in reference)
    y_ref = F.batch_norm(x.double().cpu(), ref_mean, ref_var, ref_weight, ref_bias,
                         training=True, momentum=0.3)
    assert_close(y, y_ref, FP32, 32)
    for name, ours, ref in zip(("running_mean", "running_var", "weight", "bias"), buffers,
                               reference):
        assert_close(ours, ref, FP32, 32, name=name)


def test_weight_shaped_1_by_c_is_accepted_like_torch(device):
    x = random_input((2, 3, 4, 4), FP32, device)
    weight = random_input((1, 3), FP32, device)
    bias = random_input((3, 1), FP32, device)
    y = FF.batch_norm(x, None, None, weight, bias, training=True)
    y_ref = F.batch_norm(x.double().cpu(), None, None, weight.double().cpu(),
                         bias.double().cpu(), training=True)
    assert_close(y, y_ref, FP32, 32)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_eps_like_torch(eps, training, device):
    """torch: eps > 0 in training, eps >= 0 in eval (where 0 gives a finite answer)."""
    x = random_input((2, 3, 4, 4), FP32, device)
    mean, var = _running(device)
    ref_mean, ref_var = _running("cpu", dtype=torch.float64)

    def theirs():
        return F.batch_norm(x.double().cpu(), ref_mean, ref_var, training=training, eps=eps)

    def ours():
        return FF.batch_norm(x, mean, var, training=training, eps=eps)
    if training or eps < 0:
        _raises_like_torch(ours, theirs)
        assert (mean == 0).all() and (var == 1).all()
        for fused in (FF.batch_norm_relu, FF.batch_norm_max_pool2d):
            kwargs = dict(kernel_size=2) if fused is FF.batch_norm_max_pool2d else {}
            with pytest.raises(ValueError):
                fused(x, mean, var, training=training, eps=eps, **kwargs)
    else:
        assert_close(ours(), theirs(), FP32, 1)


@pytest.mark.parametrize("call", [
    lambda x: FF.dropout(x, float("nan")),
    lambda x: FF.dropout(x, float("nan"), training=False),
    lambda x: FF.linear_relu_dropout(x[0, 0], torch.ones_like(x[0, 0]), p=float("nan")),
    lambda x: fastarch.nn.Dropout(float("nan"))(x),
], ids=["train", "eval", "fused_linear", "module"])
def test_dropout_p_nan_raises_like_torch(call, device):
    x = random_input((2, 3, 4, 4), FP32, device)
    _raises_like_torch(lambda: call(x), lambda: F.dropout(x, float("nan")))


# ----------------------------------------------------------------------------- int arguments

FLOAT_ARGUMENTS = {
    "conv_stride": (FF.conv2d, F.conv2d, lambda w: (w,), dict(stride=2.0), "stride"),
    "conv_padding": (FF.conv2d, F.conv2d, lambda w: (w,), dict(padding=1.0), "padding"),
    "conv_dilation_pair": (FF.conv2d, F.conv2d, lambda w: (w,), dict(dilation=(1, 1.0)),
                           "dilation"),
    "max_pool_stride": (FF.max_pool2d, F.max_pool2d, lambda w: (2,), dict(stride=2.0),
                        "stride"),
    "max_pool_kernel": (FF.max_pool2d, F.max_pool2d, lambda w: (2.0,), {}, "kernel_size"),
    "max_pool_bool_kernel": (FF.max_pool2d, F.max_pool2d, lambda w: (True,), {},
                             "kernel_size"),
    "avg_pool_padding_pair": (FF.avg_pool2d, F.avg_pool2d, lambda w: (3,),
                              dict(padding=(1.0, 1)), "padding"),
}


@pytest.mark.parametrize("case", FLOAT_ARGUMENTS)
def test_non_int_geometry_is_a_type_error_naming_the_argument(case, device):
    ours, theirs, args, kwargs, name = FLOAT_ARGUMENTS[case]
    x = random_input((1, 3, 6, 6), FP32, device)
    w = random_input((4, 3, 3, 3), FP32, device)
    message = _raises_like_torch(lambda: ours(x, *args(w), **kwargs),
                                 lambda: theirs(x.cpu(), *args(w.cpu()), **kwargs))
    assert f"'{name}'" in message


@pytest.mark.parametrize("ours, theirs", [(FF.max_pool2d, F.max_pool2d),
                                          (FF.avg_pool2d, F.avg_pool2d)])
@pytest.mark.parametrize("padding", [-1, (0, -1)])
def test_negative_pool_padding_gets_torchs_message(ours, theirs, padding, device):
    x = random_input((1, 3, 6, 6), FP32, device)
    message = _raises_like_torch(lambda: ours(x, 3, padding=padding),
                                 lambda: theirs(x.cpu(), 3, padding=padding))
    assert "pad must be non-negative, but got pad: -1" in message


# ----------------------------------------------------------------------------- the guard

def test_every_gpu_launch_fits_its_declared_extents():
    """The guard on every config of every family, on the compile check's meta tensors:
    what each launch declares is what its own launcher passes."""
    launches = all_launches()
    for launch in launches:
        launch.check()
    assert len(launches) > 100


def _conv_launch(device: str, **overrides) -> Launch:
    geometry = ConvGeometry((3, 3))
    tensors = dict(x=torch.randn(1, 3, 4, 4, device=device),
                   weight_rsc=torch.randn(4, 3, 3, 3, device=device),
                   bias=torch.randn(4, device=device), y=torch.empty(1, 4, 2, 2, device=device))
    tensors.update(overrides)
    config = conv_ops.forward_tile(3, 4, 27, Operand.IEEE, 4)
    return conv2d.forward_launch(tensors["x"], tensors["weight_rsc"], tensors["bias"], None,
                                 None, False, tensors["y"], None, geometry, Operand.IEEE, config)


REFUSED = {
    "bias_2d": (dict(bias=torch.randn(1, 4)), "bias_ptr"),
    "bias_too_short": (dict(bias=torch.randn(3)), "bias_ptr"),
    "weight_not_rsc_dense": (dict(weight_rsc=torch.randn(4, 3, 3, 6)[..., ::2]), "w_ptr"),
    "output_too_small": (dict(y=torch.empty(1, 3, 2, 2)), "y_ptr"),
    "integer_bias": (dict(bias=torch.ones(4, dtype=torch.int32)), "bias_ptr"),
    "other_device": (dict(bias=torch.randn(4, device="meta")), "bias_ptr"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_guard_refuses_what_the_kernel_does_not_index(case):
    overrides, name = REFUSED[case]
    with pytest.raises(LaunchArgumentError, match=f"argument {name} "):
        _conv_launch("cpu", **overrides)()


def test_guard_refuses_running_statistics_it_would_write_past():
    """(1, C) running statistics at the kernel level: refused, nothing written."""
    C = 3
    running = torch.zeros(1, C), torch.ones(1, C)
    stats = bn.BatchNormStatistics(*(torch.empty(C) for _ in range(4)))
    partials = tuple(torch.ones(2, C) for _ in range(3))
    launch = bn.finalize_launch(partials, None, None, *running, stats, 0.1, 1e-5,
                                bn_ops.merge_tile(C))
    with pytest.raises(LaunchArgumentError, match="argument running_mean_ptr "):
        launch()
    assert (running[0] == 0).all() and (running[1] == 1).all()


def test_guard_refuses_elementwise_operands_of_different_layouts():
    x = torch.randn(2, 3, 4, 4)
    y = torch.empty(2, 3, 4, 4, memory_format=torch.channels_last)
    with pytest.raises(LaunchArgumentError, match="argument y_ptr "):
        relu.forward_launch(x, y, relu_tile(x.numel()))()
    with pytest.raises(LaunchArgumentError, match="argument x_ptr .*dense"):
        relu.forward_launch(x[..., ::2], x[..., ::2], relu_tile(48))()


def test_guard_refuses_a_tensor_whose_storage_was_shrunk():
    """A view outlives its storage's resize (what FSDP does to free memory)."""
    x = torch.randn(4, 4)
    view = x[1:]
    x.untyped_storage().resize_(8 * x.element_size())
    with pytest.raises(LaunchArgumentError, match="argument x_ptr reaches element"):
        relu.forward_launch(view, torch.empty(3, 4), relu_tile(12))()


def test_guard_refuses_an_undeclared_tensor():
    launch = Launch(relu.relu_forward_kernel, (1,),
                    args={"x_ptr": torch.randn(4), "y_ptr": torch.empty(4), "N": 4},
                    constexprs={"BLOCK": 16}, extents={"x_ptr": dense(4)}, name="relu")
    with pytest.raises(LaunchArgumentError, match="y_ptr"):
        launch()


# ----------------------------------------------------------------------------- sentinel views

@dataclass
class Embedded:
    """A view into a larger buffer filled with the sentinel around (and, for an output,
    inside) the view."""
    view: torch.Tensor
    buffer: torch.Tensor  # the whole storage, flat

    def outside_untouched(self) -> bool:
        inside = torch.zeros(self.buffer.shape, dtype=torch.bool, device=self.buffer.device)
        inside.as_strided(self.view.shape, self.view.stride(),
                          self.view.storage_offset()).fill_(True)
        return bool(_is_sentinel(self.buffer[~inside]).all())

    def double(self) -> torch.Tensor:
        return self.view.detach().cpu().double()


def _sentinel(dtype: torch.dtype) -> float:
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min


def _is_sentinel(values: torch.Tensor) -> torch.Tensor:
    if values.is_floating_point():
        return values.isnan()
    return values == torch.iinfo(values.dtype).min


def output(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str) -> Embedded:
    """A view of ``shape`` in a sentinel-filled buffer. ``layout``: "strided" (every axis
    padded on both sides, the innermost one every other element), "rows" (the same with a
    dense innermost axis), "nhwc" (4-D, strided with channels innermost) or "dense"
    (contiguous, at an offset into the buffer)."""
    if layout == "dense":
        numel = math.prod(shape)
        buffer = torch.full((numel + 6,), _sentinel(dtype), dtype=dtype, device=device)
        return Embedded(buffer[3:3 + numel].view(shape), buffer)
    order = [0, 2, 3, 1] if layout == "nhwc" else list(range(len(shape)))
    sizes = [shape[axis] for axis in order]
    step = 1 if layout == "rows" else 2
    big = torch.full([size + 2 for size in sizes[:-1]] + [step * sizes[-1] + 2],
                     _sentinel(dtype), dtype=dtype, device=device)
    view = big[tuple(slice(1, 1 + size) for size in sizes[:-1])
               + (slice(1, 1 + step * sizes[-1], step),)]
    return Embedded(view.permute(*[order.index(axis) for axis in range(len(shape))]),
                    big.view(-1))


def embed(values: torch.Tensor, layout: str) -> Embedded:
    """``values`` in a view of a sentinel-filled buffer (see ``output``)."""
    embedded = output(tuple(values.shape), values.dtype, layout, str(values.device))
    embedded.view.copy_(values)
    return embedded


def _random(shape: tuple[int, ...], layout: str, device: str) -> Embedded:
    return embed(random_input(shape, FP32, device), layout)


def _assert_untouched(*embedded: Embedded) -> None:
    for index, e in enumerate(embedded):
        assert e.outside_untouched(), f"argument {index}: storage outside its view written"


N, C, H, W, K = 2, 3, 5, 5, 4


def test_conv_forward_on_sentinel_views(device):
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    P, Q = geometry.output_size(H, W)
    config = conv_ops.forward_tile(C, K, 9 * C, Operand.IEEE, N * P * Q)
    x = _random((N, C, H, W), "nhwc", device)
    weight = random_input((K, C, 3, 3), FP32, device)
    w_rsc = embed(conv_ops.weight_matrix(weight), "dense")
    bias, scale, shift = (_random((K,), "strided", device) for _ in range(3))
    y = output((N, K, P, Q), FP32, "strided", device)
    stats = output((3, triton.cdiv(N * P * Q, config.block_m), K), FP32, "dense", device)
    conv2d.forward_launch(x.view, w_rsc.view, bias.view, scale.view, shift.view, True, y.view,
                          stats.view, geometry, Operand.IEEE, config)()
    conv = F.conv2d(x.double(), weight.double().cpu(), bias.double(), padding=1)
    channel = (1, -1, 1, 1)
    expected = torch.relu(conv * scale.double().view(channel) + shift.double().view(channel))
    assert_close(y.view, expected, FP32, 9 * C)
    mean, var = merge_welford_partials(*stats.view.unbind(0))
    assert_close(mean, conv.mean((0, 2, 3)), FP32, N * P * Q, name="stats mean")
    assert_close(var, conv.var((0, 2, 3), unbiased=False), FP32, N * P * Q, name="stats var")
    _assert_untouched(x, w_rsc, bias, scale, shift, y, stats)


def test_conv_dgrad_on_sentinel_views(device):
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1))
    P, Q = geometry.output_size(H, W)
    config = conv_ops.dgrad_tile(C, K, Operand.IEEE,
                                 conv2d_backward.phase_pixels(N, H, W, geometry))
    dy = _random((N, K, P, Q), "strided", device)
    weight = random_input((K, C, 3, 3), FP32, device)
    w_rsck = embed(weight.permute(2, 3, 1, 0), "strided")
    dx = output((N, C, H, W), FP32, "nhwc", device)
    conv2d_backward.dgrad_launch(dy.view, w_rsck.view, dx.view, geometry, Operand.IEEE,
                                 config)()
    expected = torch.nn.grad.conv2d_input((N, C, H, W), weight.double().cpu(), dy.double(),
                                          stride=2, padding=1)
    assert_close(dx.view, expected, FP32, 9 * K)
    _assert_untouched(dy, w_rsck, dx)


def test_conv_wgrad_and_merge_on_sentinel_views(device):
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    P, Q = geometry.output_size(H, W)
    pixels, splits = N * P * Q, 2
    config = conv_ops.wgrad_tile(C, K, Operand.IEEE, 9, pixels)
    x = _random((N, C, H, W), "strided", device)
    dy = _random((N, K, P, Q), "nhwc", device)
    partial = output((splits, 3, 3, C, K), FP32, "strided", device)
    bias_partial = output((splits, K), FP32, "rows", device)
    conv2d_backward.wgrad_launch(x.view, dy.view, partial.view, bias_partial.view, splits,
                                 triton.cdiv(pixels, splits), geometry, Operand.IEEE, config)()
    dw = torch.nn.grad.conv2d_weight(x.double(), (K, C, 3, 3), dy.double(), padding=1)
    assert_close(partial.view.sum(0), dw.permute(2, 3, 1, 0), FP32, pixels)
    assert_close(bias_partial.view.sum(0), dy.double().sum((0, 2, 3)), FP32, pixels,
                 name="bias")
    dense_partial = embed(partial.view.contiguous(), "dense")
    dw_rsck = output((3, 3, C, K), FP32, "strided", device)
    conv2d_backward.merge_launch(dense_partial.view, dw_rsck.view,
                                 conv_ops.wgrad_merge_tile(dw_rsck.view.numel()))()
    assert_close(dw_rsck.view, dw.permute(2, 3, 1, 0), FP32, pixels, name="merged")
    _assert_untouched(x, dy, partial, bias_partial, dense_partial, dw_rsck)


M, IN, OUT = 5, 7, 6


def test_linear_forward_on_sentinel_views(device):
    config = linear_ops.gemm_tile(M, OUT, IN, Operand.IEEE, False, False)
    x, weight = _random((M, IN), "strided", device), _random((OUT, IN), "strided", device)
    bias = _random((OUT,), "strided", device)
    y = output((M, OUT), FP32, "strided", device)
    linear_kernels.gemm_launch(x.view, weight.view.t(), y.view, bias.view, None, True, 0.0,
                               Operand.IEEE, config, 1, IN, "forward")()
    product = x.double() @ weight.double().t()
    assert_close(y.view, torch.relu(product + bias.double()), FP32, IN)
    partial = output((2, M, OUT), FP32, "strided", device)
    linear_kernels.gemm_launch(x.view, weight.view.t(), partial.view, bias.view, None, True,
                               0.0, Operand.IEEE, config, 2, 4, "forward")()
    assert_close(partial.view.sum(0), product, FP32, IN, name="split-K partials")
    rows = embed(partial.view.reshape(2, M * OUT), "rows")
    y_split = output((M, OUT), FP32, "strided", device)
    linear_kernels.split_k_epilogue_launch(
        rows.view.view(2, M, OUT), y_split.view, bias.view, None, True, 0.0,
        linear_ops.row_tile(M, OUT), "forward")()
    assert_close(y_split.view, torch.relu(product + bias.double()), FP32, IN, name="split-K")
    _assert_untouched(x, weight, bias, y, partial, rows, y_split)


def test_linear_backward_and_dropout_on_sentinel_views(device):
    config = linear_ops.row_tile(M, OUT)
    p, tiles = 0.5, triton.cdiv(M, config.block_m)
    dy, y = _random((M, OUT), "strided", device), _random((M, OUT), "rows", device)
    seed = embed(torch.tensor([7], dtype=torch.int64, device=device), "dense")
    g = output((M, OUT), FP32, "dense", device)
    bias_partial = output((tiles, OUT), FP32, "dense", device)
    linear_kernels.output_grad_launch(dy.view, y.view, seed.view, g.view, bias_partial.view,
                                      True, p, config)()
    expected = torch.where(y.double() <= 0, 0.0, dy.double() / (1 - p))
    assert_close(g.view, expected, FP32)
    db = output((OUT,), FP32, "dense", device)
    partial = embed(bias_partial.view.clone(), "dense")
    linear_kernels.sum_rows_launch(partial.view, db.view, config)()
    assert_close(db.view, expected.sum(0), FP32, M, name="bias grad")
    x = _random((M, OUT), "dense", device)
    dropped = output((M, OUT), FP32, "dense", device)
    dropout_tile = dropout_ops.dropout_tile(M * OUT)
    dropout_kernels.dropout_launch(x.view, dropped.view, seed.view, p, dropout_tile)()
    plain = torch.empty_like(x.view)
    dropout_kernels.dropout_launch(x.view.clone(), plain, seed.view.clone(), p, dropout_tile)()
    assert torch.equal(dropped.view, plain)
    kept = dropped.view != 0
    assert torch.equal(dropped.view[kept], x.view[kept] / (1 - p))
    _assert_untouched(dy, y, seed, g, bias_partial, db, partial, x, dropped)


def test_batch_norm_on_sentinel_views(device):
    eps, momentum = 1e-5, 0.1
    config, steps, tiles = bn_ops.reduction_plan(N * H * W, C)
    merge = bn_ops.merge_tile(C)
    elementwise = nhwc_tile(C, N * H * W)
    x = _random((N, C, H, W), "nhwc", device)
    partials = output((3, tiles, C), FP32, "dense", device)
    bn.partials_launch(x.view, partials.view, steps, config)()
    x64 = x.double()
    mean, var = merge_welford_partials(*partials.view.unbind(0))
    assert_close(mean, x64.mean((0, 2, 3)), FP32, N * H * W, name="partials mean")
    assert_close(var, x64.var((0, 2, 3), unbiased=False), FP32, N * H * W, name="partials var")

    strided_partials = embed(partials.view, "strided")
    weight, bias = _random((C,), "strided", device), _random((C,), "strided", device)
    running = [embed(random_input((C,), FP32, device).abs() + 0.5, "strided")
               for _ in range(2)]
    before = [r.double() for r in running]
    stats = [output((C,), FP32, "dense", device) for _ in range(4)]
    statistics = bn.BatchNormStatistics(*(s.view for s in stats))
    bn.finalize_launch(tuple(strided_partials.view.unbind(0)), weight.view, bias.view,
                       running[0].view, running[1].view, statistics, momentum, eps, merge)()
    var64 = x64.var((0, 2, 3), unbiased=False)
    assert_close(statistics.mean, x64.mean((0, 2, 3)), FP32, N * H * W, name="mean")
    assert_close(statistics.invstd, (var64 + eps).rsqrt(), FP32, N * H * W, name="invstd")
    assert_close(statistics.scale, weight.double() * (var64 + eps).rsqrt(), FP32, N * H * W)
    assert_close(statistics.shift, bias.double(), FP32, name="shift")
    assert_close(running[0].view, (1 - momentum) * before[0] + momentum * x64.mean((0, 2, 3)),
                 FP32, N * H * W, name="running_mean")
    assert_close(running[1].view,
                 (1 - momentum) * before[1] + momentum * x64.var((0, 2, 3), unbiased=True),
                 FP32, N * H * W, name="running_var")

    x64.requires_grad_(True)
    w64, b64 = (t.double().requires_grad_(True) for t in (weight, bias))
    y64 = torch.relu(F.batch_norm(x64, None, None, w64, b64, training=True, eps=eps))
    y = output((N, C, H, W), FP32, "strided", device)
    bn.apply_launch(x.view, y.view, statistics, True, elementwise)()
    assert_close(y.view, y64, FP32, N * H * W, name="apply")

    dy = _random((N, C, H, W), "strided", device)
    y64.backward(dy.double())
    backward_partials = output((2, bn_ops.whole_merge_steps(tiles, merge), C), FP32, "dense",
                               device)
    bn.backward_partials_launch(x.view, dy.view, statistics, True, backward_partials.view,
                                steps, config)()
    rows = embed(backward_partials.view, "rows")
    sums = [output((C,), FP32, "dense", device) for _ in range(2)]
    grads = [output((C,), FP32, "dense", device) for _ in range(2)]
    backward_sums = bn.BackwardSums(*(s.view for s in sums))
    bn.backward_reduce_launch(rows.view, backward_sums, grads[0].view, grads[1].view, merge)()
    assert_close(grads[0].view, w64.grad, FP32, N * H * W, name="weight grad")
    assert_close(grads[1].view, b64.grad, FP32, N * H * W, name="bias grad")
    dx = output((N, C, H, W), FP32, "nhwc", device)
    bn.backward_input_launch(x.view, dy.view, dx.view, statistics, backward_sums, True,
                             elementwise)()
    assert_close(dx.view, x64.grad, FP32, N * H * W, name="input grad")
    _assert_untouched(x, partials, strided_partials, weight, bias, *running, *stats, y, dy,
                      backward_partials, rows, *sums, *grads, dx)


def test_pools_on_sentinel_views(device):
    geometry = PoolGeometry((3, 3), (2, 2), (1, 1))
    P, Q = geometry.output_size(H, W)
    config = nhwc_tile(C, N * P * Q)
    x = _random((N, C, H, W), "nhwc", device)
    x64 = x.double().requires_grad_(True)
    y, offsets, indices = (output((N, C, P, Q), dtype, "strided", device)
                           for dtype in (FP32, torch.int8, torch.int64))
    max_pool.forward_launch(x.view, y.view, offsets.view, indices.view, geometry, config)()
    y64, indices64 = F.max_pool2d(x64, 3, 2, 1, return_indices=True)
    assert_close(y.view, y64, FP32)
    assert torch.equal(indices.view.cpu(), indices64)
    dy = _random((N, C, P, Q), "nhwc", device)
    y64.backward(dy.double())
    own_offsets = embed(offsets.view, "rows")
    dx = output((N, C, H, W), FP32, "strided", device)
    max_pool.backward_launch(dy.view, own_offsets.view, dx.view, geometry, config)()
    assert_close(dx.view, x64.grad, FP32, 9, name="max pool dx")
    _assert_untouched(x, y, offsets, indices, dy, own_offsets, dx)


def test_normalized_and_adaptive_average_pools_on_sentinel_views(device):
    geometry = PoolGeometry((3, 3), (2, 2), (1, 1))
    P, Q = geometry.output_size(H, W)
    config = nhwc_tile(C, N * P * Q)
    x = _random((N, C, H, W), "strided", device)
    normalization = [_random((C,), "dense", device) for _ in range(3)]
    mean, scale, shift = (n.double().view(1, -1, 1, 1) for n in normalization)
    y = output((N, C, P, Q), FP32, "nhwc", device)
    avg_pool.avg_forward_launch(x.view, y.view, geometry, False, None, config,
                                tuple(n.view for n in normalization), True)()
    z = torch.relu((x.double() - mean) * scale + shift)
    assert_close(y.view, F.avg_pool2d(z, 3, 2, 1, count_include_pad=False), FP32, 9)
    dy = _random((N, C, P, Q), "strided", device)
    dx = output((N, C, H, W), FP32, "nhwc", device)
    avg_pool.avg_backward_launch(dy.view, dx.view, geometry, False, None, config)()
    x64 = x.double().requires_grad_(True)
    F.avg_pool2d(x64, 3, 2, 1, count_include_pad=False).backward(dy.double())
    assert_close(dx.view, x64.grad, FP32, 9, name="avg pool dx")
    adaptive = output((N, C, 3, 2), FP32, "strided", device)
    avg_pool.adaptive_forward_launch(x.view, adaptive.view, config)()
    assert_close(adaptive.view, F.adaptive_avg_pool2d(x.double(), (3, 2)), FP32, 9,
                 name="adaptive")
    dy_adaptive = _random((N, C, 3, 2), "nhwc", device)
    dx_adaptive = output((N, C, H, W), FP32, "strided", device)
    avg_pool.adaptive_backward_launch(dy_adaptive.view, dx_adaptive.view, config)()
    x64.grad = None
    F.adaptive_avg_pool2d(x64, (3, 2)).backward(dy_adaptive.double())
    assert_close(dx_adaptive.view, x64.grad, FP32, 9, name="adaptive dx")
    _assert_untouched(x, *normalization, y, dy, dx, adaptive, dy_adaptive, dx_adaptive)


def test_relu_on_sentinel_views(device):
    config = relu_tile(N * C * H * W)
    x = _random((N, C, H, W), "dense", device)
    y = output((N, C, H, W), FP32, "dense", device)
    relu.forward_launch(x.view, y.view, config)()
    assert_close(y.view, torch.relu(x.double()), FP32)
    dy = _random((N, C, H, W), "dense", device)
    dx = output((N, C, H, W), FP32, "dense", device)
    relu.backward_launch(y.view, dy.view, dx.view, config)()
    assert_close(dx.view, torch.where(x.double() <= 0, 0.0, dy.double()), FP32)
    _assert_untouched(x, y, dy, dx)
