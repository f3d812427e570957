"""VGG11/13/16/19 (configurations A, B, D, E) with and without BatchNorm, torchvision's layout,
state_dict keys and initialisation."""
from typing import Union

import torch

from fastarch import nn

CONFIGS: dict[str, list[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


class VGG(torch.nn.Module):
    def __init__(self, features: torch.nn.Sequential, num_classes: int = 1000,
                 init_weights: bool = True, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = torch.nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            self.apply(_torchvision_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _torchvision_init(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            torch.nn.init.constant_(module.bias, 0)
    elif isinstance(module, torch.nn.BatchNorm2d):
        torch.nn.init.constant_(module.weight, 1)
        torch.nn.init.constant_(module.bias, 0)
    elif isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, 0, 0.01)
        torch.nn.init.constant_(module.bias, 0)


def make_layers(config: list[Union[int, str]], batch_norm: bool = False) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    in_channels = 3
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(entry)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(entry)
    return torch.nn.Sequential(*layers)


def _vgg(config: str, batch_norm: bool, num_classes: int, init_weights: bool,
         dropout: float) -> VGG:
    return VGG(make_layers(CONFIGS[config], batch_norm), num_classes, init_weights, dropout)


def vgg11(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("A", False, num_classes, init_weights, dropout)


def vgg11_bn(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("A", True, num_classes, init_weights, dropout)


def vgg13(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("B", False, num_classes, init_weights, dropout)


def vgg13_bn(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("B", True, num_classes, init_weights, dropout)


def vgg16(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("D", False, num_classes, init_weights, dropout)


def vgg16_bn(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("D", True, num_classes, init_weights, dropout)


def vgg19(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("E", False, num_classes, init_weights, dropout)


def vgg19_bn(num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5) -> VGG:
    return _vgg("E", True, num_classes, init_weights, dropout)
