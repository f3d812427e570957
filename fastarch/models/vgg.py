"""VGG11/13/16/19 (configurations A, B, D, E) with and without BatchNorm: torchvision's
layout, state_dict keys, arguments and initialisation (with the same seed, the same weights),
fused by default (``fastarch.fusion``)."""
from typing import Any, Union

import torch

from fastarch import nn
from fastarch.fusion import fuse

# Output channels of each 3x3 convolution; "M" is a 2x2 stride-2 max pool.
CONFIGS: dict[str, list[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


class VGG(torch.nn.Module):
    """torchvision.models.VGG. The classifier's input is the last convolution's channels
    (512 in every configuration, as torchvision hard-codes) x 7 x 7. Keyword-only extras:
    ``hidden_features``, the classifier's hidden width (torchvision's 4096 by default), and
    ``fused``: True (the default) runs every Conv2d -> BatchNorm2d -> ReLU (-> MaxPool2d),
    Conv2d -> ReLU and Linear -> ReLU -> Dropout run of ``features`` and the classifier fused
    (``fastarch.fusion.fuse``); False runs module by module (for debugging)."""

    def __init__(self, features: torch.nn.Module, num_classes: int = 1000,
                 init_weights: bool = True, dropout: float = 0.5, *,
                 hidden_features: int = 4096, fused: bool = True) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = torch.nn.Sequential(
            nn.Linear(_last_conv_channels(features) * 7 * 7, hidden_features),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_features, num_classes),
        )
        if init_weights:
            for module in self.modules():
                _torchvision_init(module)
        if fused:
            fuse(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _last_conv_channels(features: torch.nn.Module) -> int:
    convs = [m for m in features.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("VGG: features must contain a Conv2d (its output channels size the "
                         "classifier)")
    return convs[-1].out_channels


def _torchvision_init(module: torch.nn.Module) -> None:
    """torchvision's VGG initialisation, applied in ``modules()`` order as torchvision does
    (so the random stream, and with it every weight, matches for the same seed)."""
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
    """torchvision's ``make_layers``: conv 3x3 p1 (+ BatchNorm) + ReLU per number, a 2x2
    max pool per "M", in one Sequential (so the keys are torchvision's features.<i>.*)."""
    layers: list[torch.nn.Module] = []
    in_channels = 3
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = int(entry)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return torch.nn.Sequential(*layers)


def _vgg(config: str, batch_norm: bool, kwargs: dict[str, Any]) -> VGG:
    return VGG(make_layers(CONFIGS[config], batch_norm), **kwargs)


# torchvision's builders without downloads: keyword arguments go to VGG (num_classes,
# init_weights, dropout, hidden_features, fused); pretrained weights load with load_state_dict.
def vgg11(**kwargs: Any) -> VGG:
    return _vgg("A", False, kwargs)


def vgg11_bn(**kwargs: Any) -> VGG:
    return _vgg("A", True, kwargs)


def vgg13(**kwargs: Any) -> VGG:
    return _vgg("B", False, kwargs)


def vgg13_bn(**kwargs: Any) -> VGG:
    return _vgg("B", True, kwargs)


def vgg16(**kwargs: Any) -> VGG:
    return _vgg("D", False, kwargs)


def vgg16_bn(**kwargs: Any) -> VGG:
    return _vgg("D", True, kwargs)


def vgg19(**kwargs: Any) -> VGG:
    return _vgg("E", False, kwargs)


def vgg19_bn(**kwargs: Any) -> VGG:
    return _vgg("E", True, kwargs)
