"""The operator layer (``fastarch.ops``): every ``torch.ops.fastarch`` operator passes
``torch.library.opcheck`` (its schema tells the truth about mutation and aliasing, its fake
function matches the real op's shapes, dtypes and strides, its autograd registration is
complete, and AOTAutograd traces it with dynamic shapes), the profiler still shows each
op and each backward as a ``fastarch::`` range, and differentiating a backward (double
backward) raises an error that names torch's path."""
import collections

import pytest
import torch

from fastarch import functional
from fastarch.testing import random_input
from tiny_net import INPUT_SHAPE, TinyNet

WINDOW = ([3, 3], [2, 2], [1, 1], [1, 1], False)  # kernel, stride, padding, dilation, ceil
AVG_WINDOW = ([2, 2], [2, 2], [0, 0], True)  # kernel, stride, padding, ceil


def _cases(device: str, channels_last: bool, group_name: str) -> dict:
    """Arguments for every operator, on small tensors in the given layout."""
    def t(*shape, grad=False, dtype=torch.float32):
        return random_input(shape, dtype, device, channels_last=channels_last and len(shape) == 4,
                            requires_grad=grad)
    x, w, b = t(2, 3, 7, 7, grad=True), t(4, 3, 3, 3, grad=True), t(4, grad=True)
    gamma, beta = t(3, grad=True), t(3, grad=True)
    mean, var = t(3), t(3).abs() + 0.5
    partials = torch.ops.fastarch.batch_norm_welford_partials(x.detach())
    stats = torch.ops.fastarch.batch_norm_running_statistics(mean, var, gamma.detach(),
                                                             beta.detach(), 1e-5)
    pooled, offsets, _ = torch.ops.fastarch.max_pool2d(x.detach(), *WINDOW, True, False)
    shape, last = list(x.shape), channels_last
    y = torch.ops.fastarch.relu(x.detach())
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    conv_window = ([1, 1], [1, 1], [1, 1], [1, 1])
    conv_y, _ = torch.ops.fastarch.conv2d(x.detach(), w.detach(), b.detach(), None, None,
                                          *conv_window, True, False, None)
    a, weight = t(5, 6, grad=True), t(4, 6, grad=True)
    linear_y = torch.ops.fastarch.linear(a.detach(), weight.detach(), None, True, 0.5, seed)
    pooled_x, head = t(2, 3, 1, 1, grad=True), t(4, 3, grad=True)  # flatten(1): a view
    head_y = torch.ops.fastarch.batch_norm_linear(pooled_x.detach(), None, None, *stats, True,
                                                  True, head.detach(), None, True, 0.5, seed)
    return {
        "max_pool2d": (x, *WINDOW, True, True),
        "max_pool2d_backward": (t(*pooled.shape), offsets, shape, last, *WINDOW),
        "avg_pool2d": (x, *AVG_WINDOW, False, None),
        "avg_pool2d_backward": (t(2, 3, 4, 4), shape, last, *AVG_WINDOW, True, 3),
        "adaptive_avg_pool2d": (x, [3, 2]),
        "adaptive_avg_pool2d_backward": (t(2, 3, 3, 2), shape, last),
        "batch_norm_welford_partials": (x.detach(),),
        "batch_norm_finalize": (*partials.unbind(0), gamma.detach(), None, mean.clone(),
                                var.clone(), 0.1, 1e-5),
        "batch_norm_running_statistics": (mean, var, None, beta.detach(), 1e-3),
        "batch_norm": (x, gamma, beta, *stats, True, True),
        "batch_norm_add_relu": (x, gamma, beta, *stats, True, t(*shape, grad=True)),
        "batch_norm_max_pool2d": (x, gamma, None, *stats, True, False, *WINDOW, True, False),
        "batch_norm_max_pool2d_backward": (t(*pooled.shape), offsets, x.detach(), stats[0],
                                           *stats[2:], True, *WINDOW),
        "batch_norm_avg_pool2d": (x, None, beta, *stats, False, True, *AVG_WINDOW, True, None),
        "batch_norm_backward_reduce": (x.detach(), t(*shape), *stats, True, torch.float32,
                                       None),
        "batch_norm_backward_input": (x.detach(), t(*shape), *stats, t(3), t(3), False),
        "sync_batch_norm": (x, gamma, beta, *stats, group_name),
        "relu": (x,),
        "relu_": (x.detach().clone(),),
        "relu_backward": (y, t(*shape)),
        "conv2d": (x, w, b, None, None, *conv_window, True, True, t(*conv_y.shape, grad=True)),
        "conv2d_backward": (t(*conv_y.shape), x.detach(), w.detach(), None, conv_y, shape, last,
                            list(w.shape), *conv_window, True, True, True),
        "batch_norm_conv2d": (x, gamma, beta, *stats, True, True, w, b, None, None, *conv_window,
                              False, True),
        "conv2d_chain": (x, t(3, grad=True), t(3, grad=True).abs() + 0.5, gamma, beta, True, w,
                         b, None, None, *conv_window, False, True, True, t(4),
                         t(4).abs() + 0.5, 0.1, 1e-5),
        "conv2d_chain_backward": (t(*conv_y.shape), x.detach(), mean, var, gamma.detach(), None,
                                  True, w.detach(), None, conv_y, False, t(4), t(4).abs() + 0.5,
                                  t(4), t(4), list(w.shape), *conv_window, True, True, True),
        "batch_norm_conv2d_backward": (t(*conv_y.shape), x.detach(), w.detach(), None, conv_y,
                                       stats[0], *stats[2:], True, list(w.shape), *conv_window,
                                       True, True, True),
        "linear": (a, weight, t(4, grad=True), True, 0.5, seed),
        "batch_norm_linear": (pooled_x, gamma, beta, *stats, True, True, head, t(4, grad=True),
                              True, 0.5, seed),
        "batch_norm_linear_backward": (t(2, 4), pooled_x.detach(), head.detach(), head_y, seed,
                                       stats[0], *stats[2:], True, True, 0.5, torch.float32,
                                       True),
        "linear_backward": (t(5, 4), a.detach(), weight.detach(), linear_y, seed, True, 0.5,
                            torch.float32),
        "dropout": (x, 0.25, seed),
        "dropout_": (x.detach().clone(), 0.25, seed),
    }


def test_every_operator_has_a_case(process_group):
    names = {name.split("::")[1] for name in torch._library.custom_ops.OPDEFS
             if name.startswith("fastarch::")}
    assert names == set(_cases("cpu", False, process_group.group_name))


# channels_last inputs only change strides: the fake-tensor check compares them.
@pytest.mark.parametrize("channels_last, checks", [
    (False, ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")),
    (True, ("test_faketensor",)),
], ids=["nchw", "nhwc"])
def test_operators_pass_opcheck(device, channels_last, checks, process_group):
    failures = {}
    for name, args in _cases(device, channels_last, process_group.group_name).items():
        results = torch.library.opcheck(getattr(torch.ops.fastarch, name), args,
                                        test_utils=checks, raise_exception=False)
        failed = {test: result for test, result in results.items() if result != "SUCCESS"}
        if failed:
            failures[name] = failed
    assert not failures


def test_profiler_names_every_op_and_backward(device):
    model = TinyNet(dropout=0.5).to(device)
    x = random_input(INPUT_SHAPE, torch.float32, device, requires_grad=True)
    with torch.profiler.profile() as profile:
        model(x).sum().backward()
    names = collections.Counter(e.name for e in profile.events() if e.name.startswith("fastarch"))
    for op in ("conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
               "linear", "dropout"):
        assert names[f"fastarch::{op}"] >= 1, op
        assert names[f"fastarch::{op}.backward"] >= 1, op
    # In-place ReLUs that autograd records run the out-of-place op (ops.common.elementwise).
    assert names["fastarch::relu"] == names["fastarch::relu.backward"] == 4


DOUBLE_BACKWARD_CALLS = {
    "conv2d": lambda x: functional.conv2d(x, torch.ones_like(x[:2, :, :3, :3])),
    "max_pool2d": lambda x: functional.max_pool2d(x, 2),
    "avg_pool2d": lambda x: functional.avg_pool2d(x, 2),
    "adaptive_avg_pool2d": lambda x: functional.adaptive_avg_pool2d(x, 3),
    "batch_norm": lambda x: functional.batch_norm(x, None, None, training=True),
    "relu": lambda x: functional.relu(x),
    "linear": lambda x: functional.linear(x, torch.ones_like(x[0, 0, :3])),
}


@pytest.mark.parametrize("op", DOUBLE_BACKWARD_CALLS)
def test_double_backward_raises_an_error_naming_torchs_path(op, device):
    """fastarch has no kernels for the gradient of a gradient: the first gradient comes out
    (with create_graph=True), differentiating it again raises a clear error (README)."""
    x = random_input((2, 3, 6, 6), torch.float32, device, requires_grad=True)
    y = DOUBLE_BACKWARD_CALLS[op](x)
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"fastarch::{op}: double backward .* "
                                           f"torch.nn.functional.{op}"):
        grad.sum().backward()
