"""AlexNet with torchvision's layout (64/192/384/256/256 channels, identical state_dict keys)
and the lecture notes' compact variant (64/128/256/256)."""
import torch

from fastarch import nn


class AlexNet(torch.nn.Module):
    """torchvision.models.AlexNet, layer for layer."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5,
                 widths: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(*_features(widths))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = torch.nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(widths[-1] * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class CompactAlexNet(AlexNet):
    """The lecture notes' AlexNet: four convolutions (64, 128, 256, 256 channels)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__(num_classes, dropout, widths=(64, 128, 256, 256))


def _features(widths: tuple[int, ...]) -> list[torch.nn.Module]:
    """conv 11x11 s4 p2, pool; conv 5x5 p2, pool; 3x3 p1 convolutions; pool — with ReLUs."""
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


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    return AlexNet(num_classes, dropout)


def compact_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> CompactAlexNet:
    return CompactAlexNet(num_classes, dropout)
