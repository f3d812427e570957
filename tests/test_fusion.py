"""The fusion mechanism: Conv2d -> BatchNorm2d -> ReLU (-> pool) and Conv2d -> ReLU runs fused,
in training and inference, give what the unfused model gives, keep every module and key,
and the inference fold follows parameter and running-statistic changes."""
import copy

import pytest
import torch

import fastarch
from fastarch import functional, nn
from fastarch.fusion import fuse, fused_runs, unfuse
from fastarch.nn.fused import ConvBatchNormReLU, FusedSequential
from fastarch.testing import assert_close, random_input


def vgg_bn_like(momentum=0.1) -> torch.nn.Sequential:
    """VGG-BN's feature pattern, shrunk: conv-bn-relu blocks ending in max pools, an avg pool
    block, then the classifier's adaptive pool."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=momentum),
                nn.ReLU(inplace=True)]
    return torch.nn.Sequential(
        *block(3, 8), nn.MaxPool2d(2, 2),
        *block(8, 16), *block(16, 16), nn.MaxPool2d(2, 2),
        *block(16, 8), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d((1, 1)))


def with_gaps() -> torch.nn.Sequential:
    """Runs the mechanism must not fuse, or fuses differently: conv -> relu without BN,
    BN without a conv before it, conv -> BN without ReLU, a grouped conv."""
    return torch.nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2))


def _step(model, x, dy):
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _assert_same_model_state(fused, reference, dtype, reduction_length):
    for (name, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        if a.dtype.is_floating_point:
            assert_close(a, b.double(), a.dtype if a.dtype != torch.float32 else dtype,
                         reduction_length, name=name)
        else:
            assert torch.equal(a, b), name


# The momentum only changes how the finalize moves the running statistics, the same in
# either layout: each momentum runs in one of them.
@pytest.mark.parametrize("channels_last, momentum", [(False, 0.1), (True, None)],
                         ids=["nchw-momentum", "nhwc-cumulative"])
def test_vgg_bn_like_fused_equals_unfused_in_train_and_eval(momentum, channels_last, device):
    reference = vgg_bn_like(momentum).to(device)
    fused = fuse(copy.deepcopy(reference))
    assert isinstance(fused, FusedSequential)
    assert len(fused_runs(fused)) == 4
    x = random_input((2, 3, 8, 8), torch.float32, device, channels_last)
    for _ in range(2):
        y, dx, grads = _step(fused, x, torch.ones(2, 8, 1, 1, device=device))
        y_ref, dx_ref, grads_ref = _step(reference, x, torch.ones(2, 8, 1, 1, device=device))
        assert_close(y, y_ref.double(), torch.float32, 144, name="output")
        assert_close(dx, dx_ref.double(), torch.float32, 144, name="grad input")
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g, g_ref.double(), torch.float32, 288, name="parameter grad")
        with torch.no_grad():  # an SGD step, so the next step sees new parameters
            for p, q, g, g_ref in zip(fused.parameters(), reference.parameters(), grads,
                                      grads_ref):
                p.sub_(0.1 * g)
                q.sub_(0.1 * g_ref)
    _assert_same_model_state(fused, reference, torch.float32, 288)
    fused.eval()
    reference.eval()
    with torch.no_grad():
        assert_close(fused(x), reference(x).double(), torch.float32, 144, name="eval output")


@pytest.mark.gpu_check
def test_bf16_fused_equals_unfused(device):
    reference = vgg_bn_like().to(device)
    fused = fuse(copy.deepcopy(reference))
    x = random_input((2, 3, 12, 12), torch.bfloat16, device, channels_last=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y, dx, _ = _step(fused, x, torch.ones(2, 8, 1, 1, device=device))
        y_ref, dx_ref, _ = _step(reference, x, torch.ones(2, 8, 1, 1, device=device))
    assert_close(y, y_ref.double(), torch.bfloat16, 144, name="output")
    assert_close(dx, dx_ref.double(), torch.bfloat16, 144, name="grad input")
    for a, b in zip(fused.state_dict().values(), reference.state_dict().values()):
        assert a.dtype == b.dtype  # running statistics stay fp32


@pytest.mark.torch_fallback  # the grouped conv runs torch's convolution, as documented
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_non_fusable_gaps_give_the_unfused_result(train, device):
    reference = with_gaps().to(device).train(train)
    fused = fuse(copy.deepcopy(reference))
    assert fused_runs(fused) == [("0", "1")]  # the grouped conv runs unfused
    x = random_input((2, 3, 8, 8), torch.float32, device)
    y, dx, grads = _step(fused, x, torch.ones(2, 8, 4, 4, device=device))
    y_ref, dx_ref, grads_ref = _step(reference, x, torch.ones(2, 8, 4, 4, device=device))
    assert_close(y, y_ref.double(), torch.float32, 72, name="output")
    assert_close(dx, dx_ref.double(), torch.float32, 72, name="grad input")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref.double(), torch.float32, 128, name="parameter grad")
    _assert_same_model_state(fused, reference, torch.float32, 128)


def test_keys_modules_and_checkpoints_are_unchanged(device):
    model = torch.nn.Sequential(torch.nn.Sequential(*vgg_bn_like()), torch.nn.Flatten())
    keys = list(model.state_dict())
    children = list(model.modules())
    checkpoint = copy.deepcopy(model.state_dict())
    assert fuse(model) is model
    assert list(model.state_dict()) == keys
    assert list(model.modules()) == children
    assert type(model[0]) is FusedSequential and type(model) is torch.nn.Sequential
    model.load_state_dict(checkpoint)
    unfuse(model)
    assert type(model[0]) is torch.nn.Sequential


def test_inference_is_one_kernel_and_follows_parameter_changes(device, monkeypatch):
    model = fuse(vgg_bn_like().to(device))
    x = random_input((2, 3, 12, 12), torch.float32, device)
    model(x)  # a training step moves the running statistics off their initial values
    model.eval()
    reference = unfuse(copy.deepcopy(model))
    fused_forward = FusedSequential.forward
    checkpoint = vgg_bn_like().to(device).state_dict()

    def forward_without_batch_norm_kernels(self, input):
        with monkeypatch.context() as patch:
            for name in ("batch_norm_relu", "batch_norm_max_pool2d", "batch_norm_avg_pool2d"):
                patch.setattr(functional, name, _must_not_run)
            return fused_forward(self, input)

    monkeypatch.setattr(FusedSequential, "forward", forward_without_batch_norm_kernels)
    changes = [lambda m: None, lambda m: m[1].weight.mul_(-2.0),
               lambda m: m[1].running_var.add_(3.0), lambda m: m[0].bias.add_(1.0),
               lambda m: m[5].running_mean.sub_(0.5),
               lambda m: m.load_state_dict(checkpoint)]
    with torch.no_grad():
        for change in changes:
            change(model)
            change(reference)
            assert_close(model(x), reference(x).double(), torch.float32, 144,
                         name="eval after a change")


def _must_not_run(*args, **kwargs):
    raise AssertionError("inference must fold BatchNorm into the conv kernel")


def test_eval_with_parameter_grads_still_trains_batch_norm_parameters(device):
    reference = vgg_bn_like().to(device).eval()
    fused = fuse(copy.deepcopy(reference))
    x = random_input((2, 3, 12, 12), torch.float32, device)
    _, dx, grads = _step(fused, x, torch.ones(2, 8, 1, 1, device=device))
    _, dx_ref, grads_ref = _step(reference, x, torch.ones(2, 8, 1, 1, device=device))
    assert_close(dx, dx_ref.double(), torch.float32, 144, name="grad input")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref.double(), torch.float32, 288, name="parameter grad")


def test_conv_batch_norm_relu_block(device):
    block = ConvBatchNormReLU(3, 8, 3, padding=1, pool=nn.MaxPool2d(2)).to(device)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                    torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.MaxPool2d(2)).to(device)
    assert list(block.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(block.state_dict())
    x = random_input((2, 3, 8, 8), torch.float32, device)
    for train in (True, False):
        block.train(train)
        reference.train(train)
        assert_close(block(x), reference(x).double(), torch.float32, 27, name="output")
    assert_close(block[1].running_var, reference[1].running_var.double(), torch.float32, 27)
    assert isinstance(fastarch.nn.ConvBatchNormReLU(3, 8, 3), FusedSequential)


# ----------------------------------------------------------------------------- linear runs

def classifier(p: float, inplace: bool) -> torch.nn.Sequential:
    """torchvision's classifier pattern, shrunk: linear-relu-dropout, linear-relu, linear."""
    return torch.nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(inplace), nn.Dropout(p, inplace),
        nn.Linear(16, 16), nn.ReLU(inplace), nn.Linear(16, 5))


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_linear_runs_fused_equal_unfused_without_dropout(train, inplace, device):
    """Eval switches the dropout off; training here with p = 0 (masks are tested below)."""
    reference = classifier(0.0 if train else 0.5, inplace).to(device).train(train)
    fused = fuse(copy.deepcopy(reference))
    assert fused_runs(fused) == [("0", "1", "2"), ("3", "4")]
    x = random_input((3, 2, 12), torch.float32, device)  # leading dimensions pass through
    y, dx, grads = _step(fused, x, torch.ones(3, 2, 5, device=device))
    y_ref, dx_ref, grads_ref = _step(reference, x, torch.ones(3, 2, 5, device=device))
    assert_close(y, y_ref.double(), torch.float32, 16, name="output")
    assert_close(dx, dx_ref.double(), torch.float32, 16, name="grad input")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref.double(), torch.float32, 16, name="parameter grad")


def test_linear_relu_dropout_run_in_training_drops_and_scales_as_dropout(device):
    """The mask is recovered from the output (an element is kept exactly where it is not 0:
    the ReLU leaves 0 only where dropout cannot matter); every kept element and every
    gradient is what relu(linear) / (1 - p) with that mask gives in float64."""
    p = 0.25
    run = fuse(torch.nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Dropout(p))).to(device)
    assert fused_runs(run) == [("0", "1", "2")]
    x = random_input((32, 24), torch.float32, device, requires_grad=True)
    y = run(x)
    dy = random_input(y.shape, torch.float32, device)
    y.backward(dy)
    weight, bias = run[0].weight.double(), run[0].bias.double()
    kept = y.detach().double() != 0
    pre = torch.relu(x.detach().double() @ weight.T + bias)
    dropped = ((pre > 0) & ~kept).double().sum() / (pre > 0).double().sum()
    assert 0.1 < dropped.item() < 0.4, f"dropped {dropped.item():.2f} of the positive outputs"
    assert_close(y, torch.where(kept, pre / (1 - p), 0.0), torch.float32, 24)
    g = torch.where(kept, dy.double() / (1 - p), 0.0)
    assert_close(x.grad, g @ weight, torch.float32, 64, name="grad input")
    assert_close(run[0].weight.grad, g.T @ x.detach().double(), torch.float32, 32,
                 name="grad weight")
    assert_close(run[0].bias.grad, g.sum(0), torch.float32, 32, name="grad bias")
