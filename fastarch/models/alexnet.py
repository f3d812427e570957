"""AlexNet with torchvision's layout (64/192/384/256/256 channels, identical state_dict keys,
shapes and default initialisation) and the lecture notes' compact variant (64/128/256/256),
fused by default (``fastarch.fusion``)."""
from typing import Any, Sequence

import torch

from fastarch import nn
from fastarch.fusion import fuse

TORCHVISION_WIDTHS = (64, 192, 384, 256, 256)
COMPACT_WIDTHS = (64, 128, 256, 256)


class AlexNet(torch.nn.Module):
    """torchvision.models.AlexNet, layer for layer.

    ``widths`` (the convolutions' output channels: an 11x11 stride-4 and a 5x5 convolution,
    each followed by a 3x3 stride-2 max pool, then 3x3 convolutions and a last pool) and
    ``hidden_features`` (the classifier's hidden width) are keyword-only extras whose
    defaults are torchvision's; the tests shrink them to run under the Triton interpreter.

    ``fused`` (keyword-only): True, the default, runs every Conv2d -> ReLU of ``features``
    as one conv kernel with the ReLU in its epilogue and the classifier's Linear -> ReLU
    (-> Dropout) runs as one GEMM each (``fastarch.fusion.fuse``); the classifier's leading
    Dropout, before the first Linear, stays a kernel of its own. False runs module by module
    (for debugging).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *,
                 widths: Sequence[int] = TORCHVISION_WIDTHS,
                 hidden_features: int = 4096, fused: bool = True) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"AlexNet: widths needs at least the two large convolutions' "
                             f"channels, but got {tuple(widths)}")
        self.features = torch.nn.Sequential(*_features(tuple(widths)))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = torch.nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(widths[-1] * 6 * 6, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, num_classes),
        )
        if fused:
            fuse(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class CompactAlexNet(AlexNet):
    """The lecture notes' AlexNet: four convolutions (64, 128, 256, 256 channels), the same
    pools and classifier as torchvision's."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *,
                 hidden_features: int = 4096, fused: bool = True) -> None:
        super().__init__(num_classes, dropout, widths=COMPACT_WIDTHS,
                         hidden_features=hidden_features, fused=fused)


def _features(widths: tuple[int, ...]) -> list[torch.nn.Module]:
    """conv 11x11 s4 p2, pool; conv 5x5 p2, pool; 3x3 p1 convolutions; pool; ReLU after
    every convolution (torchvision's indices: convolutions at 0, 3, 6, 8, 10)."""
    layers: list[torch.nn.Module] = [
        nn.Conv2d(3, widths[0], kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(widths[0], widths[1], kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    ]
    for c_in, c_out in zip(widths[1:-1], widths[2:]):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    return layers


def alexnet(**kwargs: Any) -> AlexNet:
    """torchvision's ``alexnet(**kwargs)`` without downloads: the keyword arguments go to
    :class:`AlexNet`; pretrained weights load with ``load_state_dict``."""
    return AlexNet(**kwargs)


def compact_alexnet(**kwargs: Any) -> CompactAlexNet:
    """The lecture notes' AlexNet; the keyword arguments go to :class:`CompactAlexNet`."""
    return CompactAlexNet(**kwargs)
