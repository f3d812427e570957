"""fastarch.convert: torch.nn layers anywhere in a model become fastarch's, in place (the
same module objects, parameters, buffers, flags and hooks), unknown modules are left alone,
fusable runs are fused, and the converted model computes what the original did."""
import copy

import pytest
import torch
from torch import nn

import fastarch
from fastarch.convert import TWINS
from fastarch.nn import FusedSequential
from model_cases import CASES, check_against_reference, ieee_fp32

INPUT_SHAPE = (2, 3, 10, 10)


class HalvedConv(nn.Conv2d):
    """A user's Conv2d subclass: its forward differs, so convert must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class UserModel(nn.Module):
    """Every convertible layer, in a fusable Sequential, a ModuleList and a ModuleDict, beside
    modules convert does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.body = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                   nn.ReLU(inplace=True)])
        self.halved = HalvedConv(8, 8, 1)
        self.gelu = nn.GELU()
        self.pools = nn.ModuleDict({"avg": nn.AvgPool2d(2, ceil_mode=True),
                                    "adaptive": nn.AdaptiveAvgPool2d((2, 2))})
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.body:
            x = layer(x)
        x = self.gelu(self.halved(x))
        x = self.pools["adaptive"](self.pools["avg"](x))
        return self.head(torch.flatten(x, 1))


def _expected_type(module: nn.Module) -> type:
    return TWINS.get(type(module), type(module))


def test_convert_swaps_every_known_layer_in_place_and_keeps_the_rest():
    model = UserModel().train()
    model.stem[1].eval()  # a per-module flag convert must keep
    calls = []
    model.head[1].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    modules = dict(model.named_modules())
    expected_types = {name: _expected_type(m) for name, m in modules.items()}
    parameters = list(model.parameters())
    flags = {name: m.training for name, m in modules.items()}
    state = {key: t.clone() for key, t in model.state_dict().items()}

    assert fastarch.convert(model) is model
    expected_types["stem"] = FusedSequential  # the fusion pass ran
    assert {name: type(m) for name, m in model.named_modules()} == expected_types
    assert all(model.get_submodule(name) is m for name, m in modules.items())
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert type(model.halved) is HalvedConv and type(model.gelu) is nn.GELU
    converted_state = model.state_dict()
    assert list(converted_state) == list(state)
    for key, tensor in state.items():
        assert converted_state[key].dtype == tensor.dtype, key
        assert torch.equal(converted_state[key], tensor), key
    model.eval()(torch.randn(INPUT_SHAPE))
    assert calls == [torch.Size([2, 5])], "the forward hook on the Linear was lost"


def test_convert_covers_the_eight_layers_with_their_fastarch_twins():
    assert set(TWINS) == {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
                          nn.AdaptiveAvgPool2d, nn.Linear, nn.Dropout}
    for torch_type, twin in TWINS.items():
        assert issubclass(twin, torch_type) and twin.__module__.startswith("fastarch.nn")
        assert twin.__name__ == torch_type.__name__


def test_convert_converts_a_bare_layer_and_is_idempotent():
    layer = nn.Linear(3, 4)
    assert type(fastarch.convert(layer)) is fastarch.nn.Linear
    assert type(fastarch.convert(layer)) is fastarch.nn.Linear


def test_an_optimizer_built_before_convert_trains_the_converted_model(device):
    model = nn.Sequential(nn.Linear(4, 3)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fastarch.convert(model)
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 4, device=device)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_user_model_computes_what_the_original_did(mode, device):
    original = UserModel()
    with ieee_fp32():
        check_against_reference(fastarch.convert(copy.deepcopy(original)), original,
                                INPUT_SHAPE, device, mode == "train")


# The lecture notes' LeNet-5 (ReLU as F.relu calls, which stay torch's), torchvision's AlexNet
# layout and VGG11-BN (whose conv-BN-ReLU(-pool) runs convert fuses), as torch.nn models.
# (model, mode, backward): AlexNet's backward and VGG11-BN's in eval are test_models',
# kernel for kernel; gradients through converted modules are checked on the others.
CONVERT_RUNS = [("lenet5", "train", True), ("alexnet", "train", False),
                ("vgg11_bn", "train", True), ("vgg11_bn", "eval", False)]


@pytest.mark.parametrize("name, mode, backward", CONVERT_RUNS,
                         ids=[f"{n}-{m}{'' if b else '-forward'}" for n, m, b in CONVERT_RUNS])
def test_converted_reference_model_computes_what_torch_does(name, mode, backward, device):
    reference = CASES[name].reference(0.0 if mode == "train" else 0.5)
    state = {key: t.clone() for key, t in reference.state_dict().items()}
    converted = fastarch.convert(copy.deepcopy(reference))
    assert {k: (t.dtype, t.shape) for k, t in converted.state_dict().items()} \
        == {k: (t.dtype, t.shape) for k, t in state.items()}
    assert all(torch.equal(converted.state_dict()[key], t) for key, t in state.items())
    with ieee_fp32():
        check_against_reference(converted, reference, CASES[name].input_shape, device,
                                mode == "train", backward)


@pytest.mark.parametrize("name, input_shape", [("alexnet", (2, 3, 63, 63)),
                                                ("vgg11_bn", (1, 3, 32, 32))])
def test_converted_torchvision_model_computes_what_torch_does(name, input_shape, device):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    reference = getattr(torchvision.models, name)(num_classes=10, dropout=0.0)
    converted = fastarch.convert(copy.deepcopy(reference))
    with ieee_fp32():
        check_against_reference(converted, reference, input_shape, device, training=True)
