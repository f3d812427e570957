"""Every distinct layer of LeNet-5, AlexNet and VGG16-BN forward and backward on fastarch's
kernels, checked against float64 torch and timed: ``python -m fastarch layers``.

The layers are the convolutions, BatchNorms, ReLUs, pools, linear layers and dropouts
``fastarch.inventory`` traces in the models. On a GPU the models are the real ones at the
benchmarks' batches (1024 LeNet-5 images of 32x32, 256 AlexNet and 64 VGG16-BN images of
224x224). Without one the kernels run under the Triton interpreter on narrowed models
(``SMALL``), so that the command finishes in about a minute. A layer is distinct by its type,
arguments and input shape; the first one met names it. Every layer runs in training mode
(BatchNorm normalises with the batch's statistics).

The check: the output and every gradient (input, and weight and bias where the layer has
them) must be as accurate as torch's own implementation in the same dtype, within
``ERROR_FACTOR`` of torch's largest error against float64 (plus the dtype's epsilon times the
tensor's magnitude, for results torch gets exactly). A dropout is checked against the mask
its own output shows (every element kept is scaled by 1 / (1 - p), the rest are 0), since
its Philox masks differ from torch's by design.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastarch import models
from fastarch.inventory import Leaf, label, shape_text, torch_twin, trace_leaves
from fastarch.models.alexnet import TORCHVISION_WIDTHS
from fastarch.models.vgg import CONFIGS, VGG, make_layers
from fastarch.profile import seconds_per_call

ERROR_FACTOR = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIMED_CALLS = 10  # on a GPU, after a first call that compiles


@dataclass(frozen=True)
class Network:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]


FULL = (
    Network("LeNet-5", models.lenet5, (1024, 1, 32, 32)),
    Network("AlexNet", models.alexnet, (256, 3, 224, 224)),
    Network("VGG16-BN", models.vgg16_bn, (64, 3, 224, 224)),
)
# The interpreter's budget: AlexNet at an eighth of its channels at its smallest input
# (63x63), VGG16-BN at a sixteenth at 32x32, their classifiers 64 wide; the same layer kinds.
SMALL = (
    Network("LeNet-5", models.lenet5, (2, 1, 32, 32)),
    Network("AlexNet", lambda: models.AlexNet(
        widths=tuple(w // 8 for w in TORCHVISION_WIDTHS), hidden_features=64), (2, 3, 63, 63)),
    Network("VGG16-BN", lambda: VGG(make_layers(
        [c if c == "M" else int(c) // 16 for c in CONFIGS["D"]], batch_norm=True),
        hidden_features=64), (1, 3, 32, 32)),
)


@dataclass(frozen=True)
class LayerResult:
    forward_error: float
    backward_error: float
    agrees: bool
    milliseconds: float


class KnownMask(nn.Module):
    """Dropout once its mask is known: x * keep / (1 - p), in any dtype."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.scale = keep, (0.0 if p >= 1 else 1 / (1 - p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype) * self.scale


def distinct_layers(network: Network, model: nn.Module, dtype: torch.dtype) -> list[Leaf]:
    """The leaves of ``model`` (built by ``network``, in ``dtype``), one per type, arguments
    and input shape, in call order."""
    example = torch.empty(network.input_shape, device="meta", dtype=dtype)
    leaves = trace_leaves(torch_twin(model).to("meta"), example)
    distinct: dict[tuple, Leaf] = {}
    for leaf in leaves:
        key = (type(leaf.module), leaf.module.extra_repr(), leaf.input_shape)
        distinct.setdefault(key, leaf)
    return list(distinct.values())


def forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor
                     ) -> list[torch.Tensor]:
    """The output, the input gradient and the parameter gradients of one training call."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = module(x.clone())  # a clone: an in-place layer must not write the leaf x
    y.backward(dy)
    return [y.detach(), x.grad, *(p.grad for p in module.parameters())]


def _worst_ratio(ours: list[torch.Tensor], torchs: list[torch.Tensor],
                 exact: list[torch.Tensor], dtype: torch.dtype) -> float:
    """The largest of our error / the error allowed, over the results."""
    worst = 0.0
    for a, t, e in zip(ours, torchs, exact):
        allowed = ERROR_FACTOR * ((t.double() - e).abs().max().item()
                                  + torch.finfo(dtype).eps * e.abs().max().item())
        error = (a.double() - e).abs().max().item()
        worst = max(worst, error / allowed if allowed > 0 else float(error > 0) * float("inf"))
    return worst


def check_layer(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                dtype: torch.dtype, device: str, gpu: bool) -> LayerResult:
    """``module`` (fastarch's, in ``dtype``) forward and backward on random data against
    float64 torch, with torch's own error in ``dtype`` as the yardstick."""
    module.train()
    x, dy = (_random(shape, dtype, device) for shape in (input_shape, output_shape))
    ours: list[torch.Tensor] = []

    def call() -> None:
        ours[:] = forward_backward(module, x, dy)
    if gpu:
        call()  # compiles
    seconds = seconds_per_call(call, warmup=0, reps=TIMED_CALLS if gpu else 1)
    drops_p = True
    if isinstance(module, nn.Dropout):
        keep = ours[0] != 0
        twin: nn.Module = KnownMask(keep, module.p)
        drops_p = _drops_about(module.p, keep)
    else:
        twin = torch_twin(module)
    exact = forward_backward(copy.deepcopy(twin).double(), x.double(), dy.double())
    torchs = forward_backward(twin, x, dy)
    backward_error = max((a.double() - e).abs().max().item() for a, e in zip(ours[1:], exact[1:]))
    agrees = drops_p and _worst_ratio(ours, torchs, exact, dtype) <= 1.0
    return LayerResult((ours[0].double() - exact[0]).abs().max().item(), backward_error,
                       agrees, seconds * 1e3)


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    x = torch.randn(shape, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _drops_about(p: float, keep: torch.Tensor) -> bool:
    """The share of elements dropped is p, within five standard deviations."""
    dropped = 1.0 - keep.double().mean().item()
    return abs(dropped - p) <= 5 * (p * (1 - p) / keep.numel()) ** 0.5


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastarch layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda" if gpu else "cpu"), DTYPES[args.dtype]
    where = (f"compiled Triton on {torch.cuda.get_device_name()}, the models' real shapes" if gpu
             else "Triton interpreter on the CPU (no GPU here): narrowed models, small shapes")
    print(f"fastarch layers: every distinct layer of LeNet-5, AlexNet and VGG16-BN, training "
          f"forward + backward, {args.dtype}, channels_last; {where}\n")
    print(f"{'layer':44} {'input':>18} {'fwd max err':>12} {'bwd max err':>12} "
          f"{'fwd+bwd ms':>11}  float64 check")
    torch.manual_seed(0)
    checked = failures = 0
    for network in FULL if gpu else SMALL:
        with torch.device(device):
            model = network.build().to(dtype)
        for leaf in distinct_layers(network, model, dtype):
            result = check_layer(model.get_submodule(leaf.path), leaf.input_shape,
                                 leaf.output_shape, dtype, device, gpu)
            checked, failures = checked + 1, failures + (not result.agrees)
            name = f"{network.name} {leaf.path}: {label(leaf.module)}"
            print(f"{name[:44]:44} {shape_text(leaf.input_shape):>18} "
                  f"{result.forward_error:12.2e} {result.backward_error:12.2e} "
                  f"{result.milliseconds:11.2f}  {'ok' if result.agrees else 'MISMATCH'}",
                  flush=True)
    print(f"\n{checked - failures}/{checked} layers as accurate as torch's own {args.dtype} "
          f"(within {ERROR_FACTOR}x its error against float64).")
    print("Timings: " + (f"mean of {TIMED_CALLS} calls after a compiling one; benchmarks/ has "
                         "the careful ones." if gpu else "one interpreted call (numpy on the "
                         "CPU), not GPU times."))
    return 1 if failures else 0
