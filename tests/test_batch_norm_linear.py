"""Training into a classifier: a conv -> BatchNorm -> ReLU run followed by ``nn.Flatten()`` and
a Linear (run) hands the Linear its conv output and batch statistics, the Flatten is absorbed,
and the GEMM applies the BatchNorm and ReLU to its input tiles as it loads them
(``fastarch::batch_norm_linear``): the normalised tensor is never written, forward or backward.
Checked against torch.nn in float64 over training steps (outputs, every gradient, the input's,
running statistics), by the launches a step runs, and under torch.compile."""
import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

from fastarch import fusion
from fastarch.kernels import launch
from fastarch.testing import assert_close, random_input
from training_steps import (assert_compiles_to_one_graph, assert_grad_close,
                            assert_trains_as_reference, train_step)
from variants import alternating


class Case(NamedTuple):
    modules: Callable[[], list[nn.Module]]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def conv_bn_relu_flatten(c_in: int, c_out: int, kernel: int, padding: int,
                         bias: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=bias), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True), nn.Flatten()]


# H * W = 1 (flatten is a view in either layout) and H * W > 1 (a channels_last conv output is
# copied to NCHW); the linear a run with its ReLU or a plain Linear, with and without bias; a
# 72-feature GEMM (no whole K step: the masked loop) and a 512-feature one (split K).
CASES = {
    "hw1-bias-linear_relu": Case(lambda: [*conv_bn_relu_flatten(3, 16, 4, 0, bias=True),
                                          nn.Linear(16, 10), nn.ReLU()],
                                 (4, 3, 4, 4), (4, 10)),
    "hw1-nobias-linear": Case(lambda: [*conv_bn_relu_flatten(3, 16, 4, 0, bias=False),
                                       nn.Linear(16, 10, bias=False)],
                              (4, 3, 4, 4), (4, 10)),
    "hw9-nobias-linear": Case(lambda: [*conv_bn_relu_flatten(3, 8, 3, 1, bias=False),
                                       nn.Linear(72, 10)],
                              (4, 3, 3, 3), (4, 10)),
    "hw16-bias-split_k": Case(lambda: [*conv_bn_relu_flatten(3, 32, 3, 1, bias=True),
                                       nn.Linear(512, 12), nn.ReLU(inplace=True)],
                              (4, 3, 4, 4), (4, 12)),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _models(modules: list[nn.Module], dtype: torch.dtype, device: str
            ) -> tuple[nn.Sequential, nn.Sequential]:
    """(fused in ``dtype``, the torch.nn reference in float64), with the same parameters. The
    reference rounds the conv output and the BatchNorm's ReLU'd output to ``dtype``, as the
    fused model stores the one and its GEMM reads the other: else a 16-bit rounding near 0
    flips a ReLU's mask, which no tolerance covers."""
    model = nn.Sequential(*modules).to(device=device, dtype=dtype)
    with torch.no_grad():  # BatchNorm away from its identity initialisation
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).double()
    for module in reference[0], reference[2]:
        module.register_forward_hook(lambda _, inputs, y: y.to(dtype).double())
    return fusion.fuse(model), reference


class Launched(NamedTuple):
    kernel: str  # the jit function's name
    name: str  # the launch's: kernel, tile and variant


@pytest.fixture
def launched(monkeypatch) -> list[Launched]:
    """Every ``Launch`` run during the test, in order."""
    launches: list[Launched] = []
    call = launch.Launch.__call__

    def recording(self) -> None:
        launches.append(Launched(self.kernel.__name__, self.name))
        call(self)
    monkeypatch.setattr(launch.Launch, "__call__", recording)
    return launches


@pytest.mark.parametrize("case, layout, dtype_name",
                         alternating(CASES, ["nchw", "nhwc"], list(DTYPES)))
def test_conv_batch_norm_relu_into_linear_trains_as_torch(case, layout, dtype_name, device,
                                                          launched):
    dtype = DTYPES[dtype_name]
    fused, reference = _models(CASES[case].modules(), dtype, device)
    x = random_input(CASES[case].input_shape, dtype, device, channels_last=layout == "nhwc")
    assert_trains_as_reference(fused, reference, x, CASES[case].output_shape, dtype, 512)
    _assert_normalised_tensor_never_written(launched, relu=isinstance(fused[-1], nn.ReLU))


def _assert_normalised_tensor_never_written(launches: list[Launched], relu: bool) -> None:
    """Each step's forward GEMM and weight-gradient GEMM read x through the BatchNorm + ReLU
    prologue, and nothing else applies them: no BatchNorm-apply or ReLU kernel, forward or
    backward (the linear's ReLU is its epilogue's, its mask applied in the output-gradient
    pass)."""
    kernels = {kernel for kernel, _ in launches}
    assert not kernels & {"batch_norm_apply_kernel", "relu_forward_kernel",
                          "relu_backward_kernel"}, kernels
    names = [name for _, name in launches]
    for product in ("forward", "weight_grad"):
        with_prologue = [name for name in names
                         if name.startswith(f"linear_{product}[") and "+prologue_relu" in name]
        assert len(with_prologue) == 2, (product, names)
    assert not [name for name in names if name.startswith("linear_input_grad[")
                and "+prologue" in name]
    assert relu == any("+relu" in name for name in names if name.startswith("linear_forward")), \
        names


def test_dropout_after_the_linear_masks_as_its_output_says(device, launched):
    """A linear run with a training Dropout: the GEMM's epilogue drops; every output element
    is the float64 reference's / (1 - p) or 0, some of the reference's nonzero ones are 0,
    and the gradients are the reference's through that mask (the backward regenerates it)."""
    fused, reference = _models([*conv_bn_relu_flatten(3, 8, 3, 1, bias=True),
                                nn.Linear(72, 16), nn.ReLU(), nn.Dropout(0.5)],
                               torch.float32, device)
    x = random_input((4, 3, 3, 3), torch.float32, device)
    dy = random_input((4, 16), torch.float32, device)
    y, dx, grads = train_step(fused, x, dy)
    kept = y != 0
    undropped = nn.Sequential(*reference[:-1])
    with torch.no_grad():
        assert (~kept & (undropped(x.double()) > 0)).any()  # dropout dropped some
    y_ref, dx_ref, grads_ref = train_step(nn.Sequential(undropped, MaskedScale(kept, 2.0)),
                                     x.double(), dy.double())
    assert_close(y, y_ref, torch.float32, 512)
    assert_grad_close(dx, dx_ref, torch.float32, "grad input")
    for (name, _), g, g_ref in zip(fused.named_parameters(), grads, grads_ref, strict=True):
        assert_grad_close(g, g_ref, torch.float32, f"{name}.grad")
    assert any(name.startswith("linear_forward[") and name.endswith("+prologue_relu+bias+relu"
                                                                    "+dropout]")
               for _, name in launched), launched


class MaskedScale(nn.Module):
    """y * mask * scale: a dropout with a given mask."""

    def __init__(self, mask: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.mask, self.scale = mask, scale

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask * self.scale


def test_flatten_keeps_every_module_and_key(device):
    """The fused model's children and state_dict are the unfused model's: the Flatten stays
    a child, only its run is absorbed."""
    model = nn.Sequential(*CASES["hw9-nobias-linear"].modules()).to(device)
    keys = list(model.state_dict())
    fused = fusion.fuse(model)
    assert [type(m) for m in fused] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten,
                                        nn.Linear]
    assert list(fused.state_dict()) == keys


@pytest.mark.parametrize("flatten", [nn.Flatten(start_dim=2), nn.Identity()],
                         ids=["partial-flatten", "no-flatten"])
def test_other_steps_take_the_written_tensor(flatten, device, kernels_run):
    """Only ``nn.Flatten()`` then a Linear absorbs the BatchNorm: anything else between the
    run and the Linear reads the written, normalised tensor."""
    modules = [*conv_bn_relu_flatten(3, 8, 3, 1, bias=False)[:3], flatten, nn.Flatten(),
               nn.Linear(72, 10)]
    model = fusion.fuse(nn.Sequential(*modules).to(device))
    y = model(random_input((4, 3, 3, 3), torch.float32, device))
    assert y.shape == (4, 10)
    assert kernels_run.count("batch_norm_apply_kernel") == 1


def test_compiles_to_one_graph_equal_to_eager(device):
    eager, _ = _models(CASES["hw9-nobias-linear"].modules(), torch.float32, device)
    x = random_input((4, 3, 3, 3), torch.float32, device, channels_last=True)
    dy = random_input((4, 10), torch.float32, device)
    assert_compiles_to_one_graph(eager, x, dy, "fastarch.batch_norm_linear.default")