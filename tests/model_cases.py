"""What the model, convert and convergence tests share: pure torch.nn references written
from torchvision's definitions (and the lecture notes' LeNet-5) without fastarch.models (the
same state_dict keys, torch's own kernels), the model cases, shrunk where the interpreter
cannot afford the real widths, and the check of a model against its float64 reference."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastarch import models
from fastarch.models.alexnet import COMPACT_WIDTHS, TORCHVISION_WIDTHS
from fastarch.models.vgg import CONFIGS, VGG, make_layers
from fastarch.testing import random_input


class NotesLeNet5(nn.Module):
    """The lecture notes' LeNet-5: ReLU and flatten as function calls in forward."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool1 = nn.AvgPool2d(2, stride=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.AvgPool2d(2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class TorchvisionAlexNet(nn.Module):
    """torchvision's AlexNet with widths (w0..w4) and the classifier's hidden width; four
    widths give the notes' compact variant (one 3x3 convolution fewer)."""

    def __init__(self, widths: Sequence[int], hidden: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(widths[0], widths[1], kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        ]
        for index in range(2, len(widths)):
            layers += [nn.Conv2d(widths[index - 1], widths[index], kernel_size=3, padding=1),
                       nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(widths[-1] * 36, hidden), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchvisionVGG(nn.Module):
    """torchvision's VGG for a configuration (channels and "M"), with or without BatchNorm,
    and the classifier's hidden width."""

    def __init__(self, config: Sequence[Union[int, str]], batch_norm: bool, hidden: int,
                 num_classes: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(channels, int(entry), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(entry)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class ModelCase:
    ours: Callable[[float], nn.Module]  # dropout -> the fastarch model
    reference: Callable[[float], nn.Module]  # dropout -> its torch.nn reference
    input_shape: tuple[int, int, int, int]


HIDDEN = 32  # the classifiers' hidden width in the shrunk cases (torchvision's: 4096)
VGG_LETTERS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _lenet_case() -> ModelCase:
    return ModelCase(lambda dropout: models.lenet5(), lambda dropout: NotesLeNet5(),
                     (2, 1, 32, 32))


def _alexnet_case() -> ModelCase:
    """torchvision's layout at a quarter of its channels, at the smallest input it takes
    (63x63: the last pool sees 3x3)."""
    widths = tuple(w // 4 for w in TORCHVISION_WIDTHS)
    return ModelCase(
        lambda dropout: models.AlexNet(10, dropout, widths=widths, hidden_features=HIDDEN),
        lambda dropout: TorchvisionAlexNet(widths, HIDDEN, 10, dropout), (2, 3, 63, 63))


def _compact_alexnet_case() -> ModelCase:
    """The notes' class itself, its convolutions at full width (the only model case past 128
    output channels), on one image: the full widths cost the interpreter."""
    return ModelCase(
        lambda dropout: models.compact_alexnet(num_classes=10, dropout=dropout,
                                               hidden_features=HIDDEN),
        lambda dropout: TorchvisionAlexNet(COMPACT_WIDTHS, HIDDEN, 10, dropout), (1, 3, 63, 63))


def _vgg_case(name: str) -> ModelCase:
    """The configuration at an eighth of its channels, 32x32 (the fifth pool leaves 1x1)."""
    full = CONFIGS[VGG_LETTERS[name.removesuffix("_bn")]]
    config = [entry if entry == "M" else int(entry) // 8 for entry in full]
    batch_norm = name.endswith("_bn")
    return ModelCase(
        lambda dropout: VGG(make_layers(config, batch_norm), num_classes=10, dropout=dropout,
                            hidden_features=HIDDEN),
        lambda dropout: TorchvisionVGG(config, batch_norm, HIDDEN, 10, dropout), (1, 3, 32, 32))


CASES: dict[str, ModelCase] = {
    "lenet5": _lenet_case(),
    "alexnet": _alexnet_case(),
    "compact_alexnet": _compact_alexnet_case(),
    **{name + suffix: _vgg_case(name + suffix) for name in VGG_LETTERS for suffix in ("", "_bn")},
}


# --------------------------------------------------------------------------- checking

# A whole model must be as accurate as torch's own implementation within a factor: its
# largest error against float64 in each tensor at most ERROR_FACTOR x (torch's own fp32, or
# bf16 autocast, error + the dtype's epsilon x the tensor's magnitude). Relative to torch's
# error, not a fixed tolerance, because magnitudes span decades (VGG's initial logits are
# 1e-3), sums cancel (bias gradients) and some gradients are zero in exact arithmetic (a conv
# bias before BatchNorm: its float noise is where the largest ratios, up to 6.4 over four
# seeds, were seen; everything else stayed under 2).
ERROR_FACTOR = 16


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 products without TF32 rounding, in our kernels and in torch's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_model(model: nn.Module, x: torch.Tensor, training: bool, backward: bool,
              autocast: bool) -> dict[str, torch.Tensor]:
    """The output and buffers after ``model(x)`` and, with ``backward``, the input and
    parameter gradients for an output gradient drawn from a fixed seed (the same in every
    run)."""
    model.train(training)
    x = x.detach().clone().requires_grad_(backward)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = model(x)
    results = {"output": out.detach()}
    results.update({name: b.detach().clone() for name, b in model.named_buffers()})
    if backward:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
        out.backward(grad.to(out.device, out.dtype))
        results["input grad"] = x.grad
        results.update({f"{name} grad": p.grad for name, p in model.named_parameters()})
    return results


def assert_as_accurate_as_torch(ours: torch.Tensor, torchs: torch.Tensor,
                                exact: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``ours`` is within ERROR_FACTOR of torch's own error against ``exact`` (float64);
    integer buffers (num_batches_tracked) are equal."""
    assert ours.dtype == torchs.dtype, f"{name}: dtype {ours.dtype}, torch's {torchs.dtype}"
    assert ours.shape == exact.shape, \
        f"{name}: shape {tuple(ours.shape)}, expected {tuple(exact.shape)}"
    if not exact.is_floating_point():
        assert torch.equal(ours.cpu(), exact), f"{name}: {ours} != {exact}"
        return
    exact = exact.double()
    our_error = (ours.cpu().double() - exact).abs().max().item()
    torch_error = (torchs.cpu().double() - exact).abs().max().item()
    floor = torch.finfo(dtype).eps * exact.abs().max().item()
    allowed = ERROR_FACTOR * (torch_error + floor)
    assert our_error <= allowed, (f"{name}: error {our_error:.3g} against float64, torch's "
                                  f"{torch_error:.3g}; allowed {allowed:.3g}")


def check_against_reference(ours: nn.Module, reference: nn.Module, input_shape: tuple,
                            device: str, training: bool, backward: bool = True,
                            autocast: bool = False) -> None:
    """``ours`` (on ``device``, fp32 or under bf16 autocast) against ``reference`` loaded with
    its weights (strictly: every key must match), run by torch on the CPU in float64 (the
    truth) and in the precision of ``ours`` (the error allowed): the output, the buffers and,
    with ``backward``, the input and parameter gradients."""
    # Our dropout masks differ from torch's by design, and the criterion leans on torch's
    # error being rounding alone.
    assert not (training and any(isinstance(m, nn.Dropout) and m.p > 0
                                 for m in reference.modules())), "no reference for dropout"
    reference.load_state_dict(ours.state_dict())
    exact_model = copy.deepcopy(reference).double()
    x = random_input(input_shape, torch.float32, "cpu")
    exact = run_model(exact_model, x.double(), training, backward, autocast=False)
    torchs = run_model(reference, x, training, backward, autocast)
    results = run_model(ours.to(device), x.to(device), training, backward, autocast)
    assert results.keys() == exact.keys()
    dtype = torch.bfloat16 if autocast else torch.float32
    for name, value in exact.items():
        assert_as_accurate_as_torch(results[name], torchs[name], value, dtype, name)
