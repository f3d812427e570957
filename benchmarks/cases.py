"""The benchmark cases as data, derived from the models themselves.

Each model is traced once on the meta device (``fastarch.inventory.trace_leaves``); every
distinct conv, BatchNorm, pool and linear layer of LeNet-5, AlexNet, VGG16-BN and ResNet-50
becomes a layer case at its real shape (identical layers, e.g. VGG's conv3_2 and conv3_3, are
one case that lists the others in ``also``), every distinct fused run conv -> bn -> relu (->
pool) (``fastarch.fusion.fused_runs``: ResNet's stem among them; its residual blocks are
not runs of a Sequential and have no block case) a block case, and LeNet-5, AlexNet, VGG16,
VGG16-BN, ResNet-18 and ResNet-50 whole-model cases. Batches: 1024 for LeNet-5, 256 for
AlexNet (the cuDNN figures the speed targets quote for AlexNet's layers are at 128) and
ResNet-18, 128 for ResNet-50, 64 for VGG. Layers are numbered per kind in call order:
``vgg16_bn.conv7`` is VGG's conv3_3. Adaptive average pools are left out: at these input
sizes they are the identity, but for ResNet's head (7x7 -> 1x1), which its model cases time.

``--quick`` runs ``QUICK``, ``--dry-run`` ``DRY_RUN`` (a few of them) at the smoke shapes;
``--smoke`` runs ``SMOKE`` on the same architectures with every
channel and feature count divided by ``MODELS[...].smoke_divisor`` (image channels and classes
kept) at a tiny input, so that the Triton interpreter gets through them on a CPU.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastarch import fusion, models
from fastarch.inventory import Leaf, label, run_cost, shape_text, torch_twin, trace_leaves
from fastarch.roofline import Cost


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[[], nn.Module]
    batch: int
    image: tuple[int, int, int]
    smoke_batch: int
    smoke_image: tuple[int, int, int]
    smoke_divisor: int


MODELS = {
    "lenet5": ModelSpec(models.lenet5, 1024, (1, 32, 32), 2, (1, 32, 32), 1),
    "alexnet": ModelSpec(models.alexnet, 256, (3, 224, 224), 2, (3, 64, 64), 16),
    "vgg16": ModelSpec(models.vgg16, 64, (3, 224, 224), 1, (3, 32, 32), 16),
    "vgg16_bn": ModelSpec(models.vgg16_bn, 64, (3, 224, 224), 1, (3, 32, 32), 16),
    "resnet18": ModelSpec(models.resnet18, 256, (3, 224, 224), 2, (3, 32, 32), 16),
    "resnet50": ModelSpec(models.resnet50, 128, (3, 224, 224), 2, (3, 32, 32), 16),
}
LAYER_MODELS = ("lenet5", "alexnet", "vgg16_bn", "resnet50")
LAYER_KINDS = ((nn.Conv2d, "conv"), (nn.BatchNorm2d, "bn"), ((nn.MaxPool2d, nn.AvgPool2d), "pool"),
               (nn.Linear, "fc"))
# fastarch runs its static tables (FASTARCH_AUTOTUNE=off); "tuned" is fastarch autotuned
# (=on: its first, warm-up call times the candidates), on layers and blocks only; "tma" is
# fastarch's static tables with FASTARCH_CONV_ALGO=tma (the Hopper TMA convolution wherever
# it applies), on conv layers and blocks only. The fastarch contenders come last: their
# speedups need the others.
CONTENDERS = ("eager", "compile", "fastarch", "tuned", "tma")
LAYER_MODES = ("eval", "train", "fwd_bwd")
MODEL_MODES = ("eval", "train_step")

# The --quick subset (gpu_check.sh; --dry-run at the smoke shapes), in priority order, since a
# cut run keeps only its head: the headline (VGG16-BN inference, fused, vs cuDNN) first, then
# the other models, then the layers the speed targets name, then one of each remaining kind.
QUICK = (
    ("vgg16_bn", "eval"),
    ("vgg16", "eval"),
    ("alexnet", "eval"),
    ("lenet5", "eval"),
    ("lenet5", "train_step"),
    ("vgg16_bn", "train_step"),
    ("resnet50", "eval"),
    ("vgg16_bn.conv7_block", "eval"),     # conv3_3 + bn + relu + pool, fused vs eager
    ("vgg16_bn.conv7_block", "fwd_bwd"),
    ("vgg16_bn.conv6", "eval"),           # conv3_2 = conv3_3 alone vs cuDNN
    ("vgg16_bn.pool1", "eval"),           # max 2x2 on 64x64x224x224
    ("vgg16_bn.pool1", "fwd_bwd"),
    ("vgg16_bn.bn5", "train"),            # BN statistics + apply on 64x256x56x56
    ("alexnet.pool1", "eval"),            # max 3x3 s2
    ("alexnet.fc2", "eval"),              # 4096->4096 at batch 256
    ("vgg16_bn.conv2", "eval"),           # conv1_2 64->64 at 224
    ("vgg16_bn.conv6", "fwd_bwd"),
    ("lenet5.conv1", "eval"),
)
# The dry run (gpu_check.sh --dry-run, in CI, on the interpreter): the headline and one case
# of each layer kind from QUICK (a block forward and backward among them), at the smoke shapes.
DRY_RUN = (
    ("vgg16_bn", "eval"),
    ("vgg16_bn.conv7_block", "fwd_bwd"),
    ("vgg16_bn.pool1", "eval"),
    ("vgg16_bn.bn5", "train"),
    ("alexnet.fc2", "eval"),
)
# The --convs subset (gpu_check.sh's conv stage): every conv layer in eval, VGG first (the
# issue's 3x3 targets), then AlexNet and LeNet-5; with --dry-run only these, at smoke shapes.
CONV_MODELS = ("vgg16_bn", "alexnet", "lenet5")
CONVS_DRY_RUN = (("vgg16_bn.conv11", "eval"), ("lenet5.conv1", "eval"))
# The --smoke subset (CI, interpreter): every kind in every mode on its smallest case, every
# model in eval but VGG16-BN (CI's dry run, tests/test_gpu_check.py, times its eval at the
# same shapes), one training step (the interpreter takes seconds per large conv backward).
SMOKE = {
    "lenet5": MODEL_MODES,
    "alexnet": ("eval",),
    "vgg16": ("eval",),
    "lenet5.fc3": LAYER_MODES,
    "vgg16_bn.conv11": LAYER_MODES,
    "vgg16_bn.bn11": LAYER_MODES,
    "vgg16_bn.pool5": LAYER_MODES,
    "vgg16_bn.conv13_block": LAYER_MODES,
}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                 # conv, bn, pool, fc, block or model
    model: str
    paths: tuple[str, ...]    # the modules it runs, () for the whole model
    also: tuple[str, ...] = ()

    @property
    def modes(self) -> tuple[str, ...]:
        return MODEL_MODES if self.kind == "model" else LAYER_MODES

    def leaves(self, smoke: bool) -> list[Leaf]:
        leaves = traced(self.model, smoke)
        if not self.paths:
            return leaves
        by_path = {leaf.path: leaf for leaf in leaves}
        return [by_path[path] for path in self.paths]

    def input_shape(self, smoke: bool) -> tuple[int, ...]:
        return self.leaves(smoke)[0].input_shape

    def output_shape(self, smoke: bool) -> tuple[int, ...]:
        return self.leaves(smoke)[-1].output_shape

    def cost(self, mode: str, smoke: bool, element_size: int) -> Cost:
        """What one call must compute and move; a train step's input needs no gradient."""
        backward = mode in ("fwd_bwd", "train_step")
        return run_cost(self.leaves(smoke), element_size, backward, input_grad=mode != "train_step")

    def describe(self, smoke: bool) -> str:
        text = " + ".join(label(leaf.module) for leaf in self.leaves(smoke)) if self.paths \
            else self.model
        text += f" on {shape_text(self.input_shape(smoke))}"
        return text + (f" (also {', '.join(self.also)})" if self.also else "")


def narrow(model: nn.Module, divisor: int) -> nn.Module:
    """``model`` with every channel and feature count divided by ``divisor``, except the image
    channels (first conv's input) and the classes (last linear's output); new layers are made
    on the current default device, with torch's default initialisation."""
    if divisor == 1:
        return model
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    first, last = layers[0], layers[-1]
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            c_in = m.in_channels if m is first else m.in_channels // divisor
            new = type(m)(c_in, m.out_channels // divisor, m.kernel_size, m.stride, m.padding,
                          m.dilation, m.groups, m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            new = type(m)(m.num_features // divisor, m.eps, m.momentum, m.affine,
                          m.track_running_stats)
        elif isinstance(m, nn.Linear):
            out = m.out_features if m is last else m.out_features // divisor
            new = type(m)(m.in_features // divisor, out, m.bias is not None)
        else:
            continue
        model.set_submodule(path, new)
    return model


def build(name: str, smoke: bool, device: str) -> nn.Module:
    """The fastarch model on ``device``; the smoke model is narrowed from a meta-device one."""
    spec = MODELS[name]
    if not smoke or spec.smoke_divisor == 1:
        with torch.device(device):
            return spec.builder()
    with torch.device("meta"):
        model = spec.builder()
    with torch.device(device):
        return narrow(model, spec.smoke_divisor)


def input_shape(name: str, smoke: bool) -> tuple[int, ...]:
    spec = MODELS[name]
    return (spec.smoke_batch, *spec.smoke_image) if smoke else (spec.batch, *spec.image)


@functools.lru_cache(maxsize=None)
def traced(name: str, smoke: bool) -> list[Leaf]:
    twin = torch_twin(build(name, smoke, "meta"))
    return trace_leaves(twin, torch.empty(input_shape(name, smoke), device="meta"))


def _kind(module: nn.Module) -> str | None:
    return next((kind for cls, kind in LAYER_KINDS if isinstance(module, cls)), None)


def _layer_runs(leaves: list[Leaf]) -> list[tuple[tuple[str, ...], str, str]]:
    """(paths, kind, name) of every conv / bn / pool / fc leaf, named conv1, conv2, bn1,
    pool1, fc1, ... per kind in call order."""
    counts: Counter[str] = Counter()
    runs = []
    for leaf in leaves:
        kind = _kind(leaf.module)
        if kind is not None:
            counts[kind] += 1
            runs.append(((leaf.path,), kind, f"{kind}{counts[kind]}"))
    return runs


def _block_runs(model: str, layer_names: dict[str, str]) -> list[tuple[tuple[str, ...], str, str]]:
    """(paths, "block", name) of every conv -> bn -> relu (-> pool) run fusion fuses (its
    conv -> relu runs are the conv cases with a ReLU epilogue; its linear -> relu -> dropout
    runs are left out: their training output is random), named after the conv."""
    runs = fusion.fused_runs(build(model, False, "meta"))
    return [(run, "block", f"{layer_names[run[0]]}_block") for run in runs
            if len(run) >= 3 and layer_names[run[0]].startswith("conv")]


def _distinct(model: str, runs: list[tuple[tuple[str, ...], str, str]]) -> list[Case]:
    """One case per distinct run of layers (same modules, same input shape); the first
    run's name, the others in ``also``."""
    by_path = {leaf.path: leaf for leaf in traced(model, False)}
    groups: dict[tuple, list[tuple[tuple[str, ...], str, str]]] = {}
    for run in runs:
        leaves = [by_path[path] for path in run[0]]
        key = (tuple((type(leaf.module), leaf.module.extra_repr()) for leaf in leaves),
               leaves[0].input_shape)
        groups.setdefault(key, []).append(run)
    return [Case(f"{model}.{name}", kind, model, paths,
                 tuple(f"{model}.{other_name}" for _, _, other_name in others))
            for (paths, kind, name), *others in groups.values()]


@functools.lru_cache(maxsize=None)
def all_cases() -> tuple[Case, ...]:
    cases = [Case(name, "model", name, ()) for name in MODELS]
    for model in LAYER_MODELS:
        layers = _layer_runs(traced(model, False))
        cases += _distinct(model, layers)
        cases += _distinct(model, _block_runs(model, {run[0][0]: run[2] for run in layers}))
    return tuple(cases)


def scenarios(subset: str = "full") -> list[tuple[Case, str]]:
    """(case, mode) pairs in run order: every case, whole models first ("full"), the "quick"
    or "dry-run" subset in its priority order, every conv layer in eval ("convs", or its
    "convs-dry-run" share), or the "smoke" subset."""
    by_name = {case.name: case for case in all_cases()}
    named = {"quick": QUICK, "dry-run": DRY_RUN, "convs-dry-run": CONVS_DRY_RUN}
    if subset in named:
        return [(by_name[name], mode) for name, mode in named[subset]]
    if subset == "convs":
        return [(case, "eval") for model in CONV_MODELS for case in all_cases()
                if case.kind == "conv" and case.model == model]
    return [(case, mode) for case in all_cases() for mode in case.modes
            if subset == "full" or mode in SMOKE.get(case.name, ())]
