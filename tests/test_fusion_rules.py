"""What fusion and the functional API must never get wrong, each against torch (float64) or
torch's exception:

* a run fuses only modules of exactly torch.nn's (or fastarch.nn's) types: subclasses, a
  module with its own ``forward``, parametrized modules run as themselves;
* a run whose modules carry a hook (forward, forward pre-, backward, backward pre-; global
  ones too) runs module by module, so every hook fires: ``weight_norm`` / ``spectral_norm``
  and parametrizations train as in torch; state-dict hooks do not matter;
* the eval fold follows every write to what it folds, ``.data`` writes included;
* forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``) gives
  torch's tangents (through torch's implementation, a counted fallback), never zeros;
* in-place ReLU and dropout raise torch's error before writing where torch refuses to write.
"""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fastarch
from fastarch import backend, functional
from fastarch.fusion import fuse, fused_runs
from fastarch.testing import assert_close, random_input
from tiny_net import randomize_batch_norm

X_SHAPE = (2, 2, 6, 6)
ALL_RUNS = [("0", "1", "2", "3"), ("4", "5")]


def small_net() -> nn.Sequential:
    """torch.nn only: a conv-bn-relu-maxpool run and a conv-relu run."""
    return randomize_batch_norm(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))


def converted_and_reference(model: nn.Module, device: str) -> tuple[nn.Module, nn.Module]:
    """(fastarch.convert of ``model``, a float64 torch.nn copy of it)."""
    model = model.to(device)
    reference = copy.deepcopy(model).double()
    return fastarch.convert(model), reference


def assert_same_output(model: nn.Module, reference: nn.Module, device: str,
                       reduction_length: int = 36) -> None:
    x = random_input(X_SHAPE, torch.float32, device)
    assert_close(model(x), reference(x.double()), torch.float32, reduction_length)


# ----------------------------------------------------------------------------- exact types

class HalvedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class ShiftedBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class LeakyReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.5)


class NegatedMaxPool(nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


class FastarchHalvedConv(fastarch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


@pytest.mark.parametrize("index, subclass, torch_subclass, expected", [
    (0, HalvedConv, HalvedConv, [ALL_RUNS[1]]),
    (0, FastarchHalvedConv, HalvedConv, [ALL_RUNS[1]]),
    (1, ShiftedBatchNorm, ShiftedBatchNorm, [ALL_RUNS[1]]),
    (2, LeakyReLU, LeakyReLU, [ALL_RUNS[1]]),
    (3, NegatedMaxPool, NegatedMaxPool, [("0", "1", "2"), ALL_RUNS[1]]),
], ids=["conv", "fastarch-conv", "batch-norm", "relu", "pool"])
def test_a_subclass_in_a_sequential_runs_its_own_forward(index, subclass, torch_subclass,
                                                         expected, device):
    model, reference = converted_and_reference(small_net(), device)
    model[index].__class__ = subclass  # same parameters and buffers, its own forward
    reference[index].__class__ = torch_subclass
    fastarch.convert(model)
    assert type(model[index]) is subclass, "convert must leave a subclass alone"
    assert fused_runs(model) == expected
    for train in (True, False):
        assert_same_output(model.train(train), reference.train(train), device)


def test_an_instance_forward_is_not_skipped(device):
    model, reference = converted_and_reference(small_net(), device)
    for net in (model, reference):
        conv = net[4]
        conv.forward = lambda x, conv=conv: type(conv).forward(conv, x) - 2.0
    assert fused_runs(model) == [ALL_RUNS[0]]
    assert_same_output(model, reference, device)


class DoubledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class ScaledDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 3.0


def small_classifier() -> nn.Sequential:
    """torch.nn only: a linear-relu-dropout run and a linear-relu run."""
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4),
                         nn.ReLU())


@pytest.mark.parametrize("change, expected", [
    (None, [("0", "1", "2"), ("3", "4")]),
    ((0, DoubledLinear), [("3", "4")]),
    ((1, LeakyReLU), [("3", "4")]),
    ((2, ScaledDropout), [("0", "1"), ("3", "4")]),
    ((2, "forward_hook"), [("0", "1"), ("3", "4")]),
    ((1, "forward_pre_hook"), [("3", "4")]),
], ids=["exact", "linear-subclass", "relu-subclass", "dropout-subclass", "hooked-dropout",
        "hooked-relu"])
def test_linear_runs_take_only_exact_unhooked_modules(change, expected, device):
    """In eval (dropout off) the converted classifier computes what torch.nn does, and every
    hook fires once per forward."""
    model, reference = converted_and_reference(small_classifier(), device)
    calls = []
    if change is not None:
        index, how = change
        for net in (model, reference):
            if isinstance(how, str):
                getattr(net[index], f"register_{how}")(lambda *args: calls.append(index))
            else:
                net[index].__class__ = how
    fastarch.convert(model)
    assert fused_runs(model) == expected
    model.eval()
    x = random_input((3, 6), torch.float32, device)
    assert_close(model(x), reference.eval()(x.double()), torch.float32, 8)
    assert len(calls) == (2 if change is not None and isinstance(change[1], str) else 0)


# ----------------------------------------------------------------------------- hooks

def _add_hook(module: nn.Module, kind: str, calls: list) -> torch.utils.hooks.RemovableHandle:
    def record(*args):
        calls.append(kind)
    if kind == "forward_pre":
        return module.register_forward_pre_hook(record)
    if kind == "forward":
        return module.register_forward_hook(record)
    if kind == "backward":
        return module.register_full_backward_hook(record)
    if kind == "backward_pre":
        return module.register_full_backward_pre_hook(record)
    return module.register_backward_hook(record)


HOOK_KINDS = ["forward_pre", "forward", "backward", "backward_pre", "legacy_backward"]


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["conv", "batch-norm", "relu", "pool"])
def test_a_hooked_module_keeps_its_run_unfused_until_the_hook_goes(kind, index):
    model = fuse(small_net())
    handle = _add_hook(model[index], kind, [])
    expected = [("0", "1", "2"), ALL_RUNS[1]] if index == 3 else [ALL_RUNS[1]]
    assert fused_runs(model) == expected
    handle.remove()
    assert fused_runs(model) == ALL_RUNS


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_every_hook_fires_and_sees_torch_values(kind, device):
    model, reference = converted_and_reference(small_net(), device)
    calls, reference_calls = [], []
    for index in range(len(model)):
        _add_hook(model[index], kind, calls)
        _add_hook(reference[index], kind, reference_calls)
    x = random_input(X_SHAPE, torch.float32, device, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    y, y_ref = model(x), reference(x_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert calls == reference_calls and len(calls) == len(model)
    assert_close(y, y_ref, torch.float32, 36)
    assert_close(x.grad, x_ref.grad, torch.float32, 36, name="grad input")


def test_a_forward_hook_that_changes_an_output_is_applied(device):
    model, reference = converted_and_reference(small_net(), device)
    for net in (model, reference):
        net[1].register_forward_hook(lambda module, args, out: out * -3.0)
        net[4].register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    assert fused_runs(model) == []
    for train in (True, False):
        assert_same_output(model.train(train), reference.train(train), device)


@pytest.mark.parametrize("register", [
    nn.modules.module.register_module_forward_pre_hook,
    nn.modules.module.register_module_forward_hook,
    nn.modules.module.register_module_full_backward_hook,
    nn.modules.module.register_module_full_backward_pre_hook,
], ids=["forward_pre", "forward", "backward", "backward_pre"])
def test_a_global_hook_unfuses_every_run(register):
    model = fuse(small_net())
    handle = register(lambda *args: None)
    try:
        assert fused_runs(model) == []
    finally:
        handle.remove()
    assert fused_runs(model) == ALL_RUNS


def test_a_global_forward_hook_that_changes_outputs_is_applied(device):
    model, reference = converted_and_reference(small_net(), device)
    x = random_input(X_SHAPE, torch.float32, device)

    def shift_convs(module, args, out):
        return out + 0.25 if isinstance(module, nn.Conv2d) else None
    handle = nn.modules.module.register_module_forward_hook(shift_convs)
    try:
        assert_close(model(x), reference(x.double()), torch.float32, 36)
    finally:
        handle.remove()


def test_state_dict_hooks_do_not_unfuse():
    model = fuse(small_net())
    model[0].register_state_dict_pre_hook(lambda *args: None)
    model[1].register_state_dict_post_hook(lambda *args: None)
    model[2].register_load_state_dict_pre_hook(lambda *args: None)
    model[3].register_load_state_dict_post_hook(lambda *args: None)
    assert fused_runs(model) == ALL_RUNS


# ----------------------------------------------------------------------------- reparametrized

class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2.0


REPARAMETRIZATIONS = {
    "weight_norm": lambda conv: nn.utils.weight_norm(conv),
    "spectral_norm": lambda conv: nn.utils.spectral_norm(conv),
    "parametrizations.weight_norm": lambda conv: nn.utils.parametrizations.weight_norm(conv),
    "parametrizations.spectral_norm":
        lambda conv: nn.utils.parametrizations.spectral_norm(conv),
    "parametrize": lambda conv: parametrize.register_parametrization(conv, "weight", Doubled()),
}


@pytest.mark.parametrize("name", list(REPARAMETRIZATIONS))
def test_a_reparametrized_conv_trains_as_in_torch(name, device):
    """The reparametrized weight is recomputed from the parameters the optimizer steps: the
    next forward must see it (a forward pre-hook, or a parametrized subclass)."""
    model = small_net().to(device)
    reference = copy.deepcopy(model)  # weight_norm modules cannot be deep-copied
    for net in (model, reference):
        torch.manual_seed(1)  # spectral_norm draws its power-iteration vectors
        for index in (0, 4):
            REPARAMETRIZATIONS[name](net[index])
    if name.startswith("param"):
        assert type(model[0]) is not nn.Conv2d and isinstance(model[0], nn.Conv2d)
    reference.double()
    fastarch.convert(model)
    assert fused_runs(model) == []
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.5) for net in (model, reference)]
    x = random_input(X_SHAPE, torch.float32, device)
    for net, optimizer in zip((model, reference), optimizers):
        net(x.to(net[1].weight.dtype)).square().sum().backward()
        optimizer.step()
    for train in (True, False):
        assert_same_output(model.train(train), reference.train(train), device)


# ----------------------------------------------------------------------------- eval fold

DATA_WRITES = {
    "running_mean": lambda net: net[1].running_mean.data.mul_(0.5),
    "running_var": lambda net: net[1].running_var.data.add_(2.0),
    "weight": lambda net: net[1].weight.data.mul_(-1.5),
    "bias": lambda net: net[1].bias.data.sub_(0.75),
    "conv_bias": lambda net: net[0].bias.data.add_(1.0),
    "ema": lambda net: [p.data.mul_(0.9).add_(torch.ones_like(p.data), alpha=0.1)
                        for p in net.parameters()],
    "eps": lambda net: setattr(net[1], "eps", 0.5),
}


@pytest.mark.parametrize("write", list(DATA_WRITES))
def test_the_eval_fold_sees_writes_through_data(write, device):
    model, reference = converted_and_reference(small_net(), device)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_same_output(model, reference, device)  # folded once
        for net in (model, reference):
            DATA_WRITES[write](net)
        assert_same_output(model, reference, device)


# ----------------------------------------------------------------------------- forward-mode AD

def _conv(x, w, b):
    return F.conv2d(x, w, b, padding=1)


def _conv_fastarch(x, w, b):
    return functional.conv2d(x, w, b, padding=1)


def _batch_norm(module, x, w, b):
    return module.batch_norm(x, None, None, w, b, training=True)


# name: (fastarch fn, torch fn, input shapes): every input gets a tangent
FORWARD_AD_CASES = {
    "conv2d": (_conv_fastarch, _conv, [(1, 2, 5, 5), (3, 2, 3, 3), (3,)]),
    "linear": (functional.linear, F.linear, [(4, 5), (3, 5), (3,)]),
    "relu": (functional.relu, F.relu, [(2, 3, 4)]),
    "max_pool2d": (lambda x: functional.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2),
                   [(1, 2, 4, 4)]),
    "avg_pool2d": (lambda x: functional.avg_pool2d(x, 3, 1, 1),
                   lambda x: F.avg_pool2d(x, 3, 1, 1), [(1, 2, 4, 4)]),
    "adaptive_avg_pool2d": (lambda x: functional.adaptive_avg_pool2d(x, 3),
                            lambda x: F.adaptive_avg_pool2d(x, 3), [(1, 2, 5, 5)]),
    "batch_norm": (lambda x, w, b: _batch_norm(functional, x, w, b),
                   lambda x, w, b: _batch_norm(F, x, w, b), [(3, 2, 2, 2), (2,), (2,)]),
}


def _primals_and_tangents(shapes, device):
    primals = [random_input(shape, torch.float32, device) for shape in shapes]
    tangents = [random_input(shape, torch.float32, device) for shape in shapes]
    return primals, tangents


def _torch_jvp(torch_fn, primals, tangents):
    return torch.func.jvp(torch_fn, tuple(p.double() for p in primals),
                          tuple(t.double() for t in tangents))


@pytest.mark.torch_fallback  # forward-mode AD runs torch's implementation, counted
@pytest.mark.parametrize("name", list(FORWARD_AD_CASES))
def test_forward_mode_ad_gives_torch_tangents(name, device):
    fastarch_fn, torch_fn, shapes = FORWARD_AD_CASES[name]
    primals, tangents = _primals_and_tangents(shapes, device)
    expected, expected_tangent = _torch_jvp(torch_fn, primals, tangents)
    before = backend.fallback_counts.total()
    out, tangent = torch.func.jvp(fastarch_fn, tuple(primals), tuple(tangents))
    assert_close(out, expected, torch.float32, 18)
    assert_close(tangent, expected_tangent, torch.float32, 18, name="jvp tangent")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        dual_out = fwAD.unpack_dual(fastarch_fn(*duals))
    assert_close(dual_out.primal, expected, torch.float32, 18)
    assert_close(dual_out.tangent, expected_tangent, torch.float32, 18, name="dual tangent")
    assert backend.fallback_counts.total() == before + 2, "counted as torch fallbacks"
    fastarch_fn(*primals)  # outside forward-mode AD the kernels run again
    assert backend.fallback_counts.total() == before + 2


@pytest.mark.torch_fallback
@pytest.mark.parametrize("name", ["linear", "relu", "max_pool2d"])
def test_jacfwd_gives_torch_jacobians(name, device):
    fastarch_fn, torch_fn, shapes = FORWARD_AD_CASES[name]
    primals, _ = _primals_and_tangents(shapes, device)
    jacobian = torch.func.jacfwd(fastarch_fn)(*primals)
    expected = torch.func.jacfwd(torch_fn)(*(p.double() for p in primals))
    assert_close(jacobian, expected, torch.float32, 18, name="jacobian")


@pytest.mark.torch_fallback
def test_dropout_tangent_is_the_mask_of_its_output(device):
    x, t = random_input((4, 8), torch.float32, device), random_input((4, 8), torch.float32, device)
    out, tangent = torch.func.jvp(lambda a: functional.dropout(a, 0.5), (x,), (t,))
    scale = out.double() / x.double()  # 0 or 1 / (1 - p) per element
    assert set(scale.unique().tolist()) <= {0.0, 2.0}
    assert_close(tangent, scale * t.double(), torch.float32)


def _model_jvp(net: nn.Module, primals: dict, tangents: dict, dtype: torch.dtype,
               transform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of ``net`` and its tangent for the input and parameters in ``primals``
    (name "x": the input), by torch.func.jvp (``transform``) or forward_ad dual tensors."""
    primals = {name: p.to(dtype) for name, p in primals.items()}
    tangents = {name: t.to(dtype) for name, t in tangents.items()}

    def f(values: dict) -> torch.Tensor:
        params = {name: value for name, value in values.items() if name != "x"}
        return torch.func.functional_call(net, params, (values["x"],))
    if transform:
        return torch.func.jvp(f, (primals,), (tangents,))
    with fwAD.dual_level():
        out = f({name: fwAD.make_dual(p, tangents[name]) for name, p in primals.items()})
        return tuple(fwAD.unpack_dual(out))


@pytest.mark.torch_fallback
@pytest.mark.parametrize("train, transform", [(True, False), (False, False), (False, True)],
                         ids=["train-forward_ad", "eval-forward_ad", "eval-jvp"])
def test_a_fused_model_gives_torch_tangents_for_input_and_parameters(train, transform,
                                                                     device):
    """(torch.func.jvp cannot train: the running statistics it would update are captured.)"""
    model, reference = converted_and_reference(small_net(), device)
    model.train(train)
    reference.train(train)
    primals = {name: p.detach() for name, p in model.named_parameters()}
    primals["x"] = random_input(X_SHAPE, torch.float32, device)
    tangents = {name: torch.randn_like(p) for name, p in primals.items()}
    out, tangent = _model_jvp(model, primals, tangents, torch.float32, transform)
    expected, expected_tangent = _model_jvp(reference, primals, tangents, torch.float64,
                                            transform)
    assert_close(out, expected, torch.float32, 36)
    assert_close(tangent, expected_tangent, torch.float32, 36, name="tangent")


# ----------------------------------------------------------------------------- in-place writes

def _leaf(device):
    return torch.randn(2, 3, device=device, requires_grad=True)


def _no_grad_view(device):
    base = _leaf(device) * 1.0
    with torch.no_grad():
        return base[0]


def _inference_tensor(device):
    with torch.inference_mode():
        return torch.randn(2, 3, device=device)


REFUSED = {
    "leaf": _leaf,
    "view-of-leaf": lambda device: _leaf(device)[0],
    "multi-output-view": lambda device: (_leaf(device) * 1.0).unbind(0)[0],
    "no-grad-view": _no_grad_view,
    "inference-tensor": _inference_tensor,
}
IN_PLACE = {
    "relu": (lambda t: functional.relu(t, inplace=True), torch.relu_),
    "dropout": (lambda t: functional.dropout(t, 0.5, True, inplace=True),
                lambda t: F.dropout(t, 0.5, True, inplace=True)),
}


def _storage_values(t: torch.Tensor) -> torch.Tensor:
    base = t._base if t._is_view() else t
    with torch.inference_mode():
        return base.detach().clone()


@pytest.mark.parametrize("op", list(IN_PLACE))
@pytest.mark.parametrize("case", list(REFUSED))
def test_an_in_place_write_torch_refuses_raises_torch_error_and_writes_nothing(op, case,
                                                                               device):
    ours, torch_op = IN_PLACE[op]
    target = REFUSED[case](device)
    with pytest.raises(Exception) as expected:
        torch_op(REFUSED[case](device))
    before = _storage_values(target)
    with pytest.raises(type(expected.value)) as raised:
        ours(target)
    assert str(raised.value) == str(expected.value)
    assert torch.equal(_storage_values(target), before), "the refused tensor was written"


@pytest.mark.parametrize("case", ["non-leaf", "view-of-non-leaf"])
def test_in_place_relu_where_torch_accepts_gives_torch_values_and_grads(case, device):
    x = random_input((4, 6), torch.float32, device, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    outputs = []
    for leaf, relu_ in ((x, lambda t: functional.relu(t, inplace=True)), (x_ref, torch.relu_)):
        hidden = leaf * 2.0
        target = hidden if case == "non-leaf" else hidden[1:3]
        relu_(target)
        (hidden * hidden).sum().backward()
        outputs.append(hidden)
    assert_close(outputs[0], outputs[1], torch.float32)
    assert_close(x.grad, x_ref.grad, torch.float32, name="grad input")


def test_in_place_relu_of_a_leaf_without_grad_mode_writes_it_as_torch_does(device):
    x = random_input((4, 6), torch.float32, device, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    with torch.no_grad():
        functional.relu(x, inplace=True)
        torch.relu_(x_ref)
    assert_close(x, x_ref, torch.float32)
