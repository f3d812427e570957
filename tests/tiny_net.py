"""A network with every fastarch layer in torchvision's arrangement (features, avgpool,
classifier), small enough for the Triton interpreter: the model the interoperability tests
(compile, CUDA graphs, autocast, distributed, serialization) put through PyTorch's machinery.
Its features hold every fusable run: conv-bn-relu-maxpool, conv-bn-relu-avgpool, conv-relu."""
import copy

import torch

from fastarch import nn

INPUT_SHAPE = (2, 3, 8, 8)
CLASSES = 10


class TinyNet(torch.nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = torch.nn.Sequential(
            nn.Dropout(dropout), nn.Linear(16 * 3 * 3, 32), nn.ReLU(inplace=True),
            nn.Linear(32, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def randomize_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affine parameters and running statistics, so eval mode and the fold are
    tested on more than the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for t in (module.weight, module.bias, module.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape,
                                                    generator=generator) + 0.5)
    return model


def torch_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy on torch's own implementation: every fastarch module (a FusedSequential
    too) becomes the torch.nn class it subclasses; same parameters and buffers, by value."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        while type(module).__module__.startswith("fastarch."):
            module.__class__ = type(module).__bases__[0]
    return twin
