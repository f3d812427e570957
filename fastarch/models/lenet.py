"""LeNet-5 as in the lecture notes: 32x32 grey input, two 5x5 convolutions each followed by
ReLU and 2x2 average pooling (the "sub-sampling" layers), then 400 -> 120 -> 84 -> classes.
The state_dict keys are the notes' (conv1, conv2, fc1, fc2, fc3); the ReLUs, which the notes
call as functions, are modules here so that they run our kernel, or fuse into the layer
before them."""
from typing import Any

import torch

from fastarch import nn
from fastarch.nn.fused import ModuleChains


class LeNet5(ModuleChains):
    """LeNet-5. ``fused`` (keyword-only): True, the default, runs each convolution with its
    ReLU as one conv kernel (the ReLU in its epilogue) and fc1, fc2 with theirs as one GEMM
    each; False runs module by module (for debugging). ``fastarch.fusion.fuse`` / ``unfuse``
    switch it later."""

    # The children in the order forward runs them: the features, a flatten, the classifier.
    chains = (("conv1", "relu1", "pool1", "conv2", "relu2", "pool2"),
              ("fc1", "relu3", "fc2", "relu4", "fc3"))

    def __init__(self, num_classes: int = 10, *, fused: bool = True) -> None:
        super().__init__(fused=fused)
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2, stride=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_chain(0, x)
        return self.run_chain(1, torch.flatten(x, 1))


def lenet5(**kwargs: Any) -> LeNet5:
    """LeNet-5; the keyword arguments go to :class:`LeNet5`."""
    return LeNet5(**kwargs)
