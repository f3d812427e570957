"""ResNet-18/34/50/101/152: torchvision's architecture, module names, state_dict keys,
arguments and initialisation (with the same seed, the same weights), built from
``fastarch.nn`` modules and fused by default: the stem's conv -> BatchNorm -> ReLU -> max pool
as one ``ConvRun``, each block as ``fastarch.nn.residual.run_residual_block``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch

from fastarch import nn
from fastarch.fusion import fuse, unfuse
from fastarch.nn.fused import ModuleChains
from fastarch.nn.residual import ResidualBlock

NormLayer = Callable[[int], torch.nn.Module]
# The planes of layer1..layer4 (torchvision's; the stem has widths[0] channels).
TORCHVISION_WIDTHS = (64, 128, 256, 512)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(ResidualBlock):
    """torchvision's BasicBlock: conv3x3 (stride) -> bn1 -> relu -> conv3x3 -> bn2, + the
    identity (through ``downsample`` if given), relu."""
    expansion = 1
    pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[torch.nn.Module] = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride


class Bottleneck(ResidualBlock):
    """torchvision's Bottleneck (ResNet V1.5: the stride on the 3x3 conv): conv1x1 -> bn1 ->
    relu -> conv3x3 (stride) -> bn2 -> relu -> conv1x1 (x4 channels) -> bn3, + the identity,
    relu."""
    expansion = 4
    pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[torch.nn.Module] = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(ModuleChains):
    """torchvision.models.ResNet. Keyword-only extras: ``widths``, the planes of layer1..4
    (torchvision's (64, 128, 256, 512) by default; the stem has widths[0] channels), and
    ``fused``: True (the default) runs the stem and every block fused; False runs module by
    module (for debugging). ``fastarch.fusion.fuse`` / ``unfuse`` switch it later."""

    chains = (("conv1", "bn1", "relu", "maxpool"),)

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[Sequence[bool]] = None,
                 norm_layer: Optional[NormLayer] = None, *,
                 widths: Sequence[int] = TORCHVISION_WIDTHS, fused: bool = True) -> None:
        super().__init__(fused=fused)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element "
                             f"tuple, got {replace_stride_with_dilation}")
        if len(widths) != 4:
            raise ValueError(f"ResNet: widths should hold the planes of the 4 layers, got "
                             f"{tuple(widths)}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3,
                               bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        _torchvision_init(self, zero_init_residual)
        (fuse if fused else unfuse)(self)  # the stem and every block

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> torch.nn.Sequential:
        """torchvision's ``_make_layer``, in its order of construction (the random stream of
        the default initialisations follows it)."""
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = torch.nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups,
                        self.base_width, previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_chain(0, x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision_init(model: ResNet, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation, in ``modules()`` order; with
    ``zero_init_residual`` each block's last BatchNorm starts at gamma = 0 (the block starts
    as the identity)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            torch.nn.init.constant_(m.weight, 1)
            torch.nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                torch.nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                torch.nn.init.constant_(m.bn2.weight, 0)


# Blocks per layer of each depth (torchvision's table).
LAYERS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _resnet(name: str, weights: Any, kwargs: dict[str, Any]) -> ResNet:
    if weights is not None:
        raise ValueError(f"{name}: fastarch downloads no weights (weights=None only); load a "
                         f"torchvision checkpoint with load_state_dict: the keys are the same")
    block, layers = LAYERS[name]
    return ResNet(block, layers, **kwargs)


# torchvision's builders without downloads (``progress`` is taken for its signature):
# keyword arguments go to ResNet (num_classes, zero_init_residual, norm_layer, widths, fused,
# ...).
def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet18", weights, kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet34", weights, kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet50", weights, kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet101", weights, kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet152", weights, kwargs)
