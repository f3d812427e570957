"""LeNet-5 as in the lecture notes: 32x32 grey input, two 5x5 convolutions each followed by
ReLU and 2x2 average pooling (the "sub-sampling" layers), then 400 -> 120 -> 84 -> classes.
The state_dict keys are the notes' (conv1, conv2, fc1, fc2, fc3); the ReLUs, which the notes
call as functions, are modules here so that they run our kernel."""
from typing import Any

import torch

from fastarch import nn


class LeNet5(torch.nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
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
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def lenet5(**kwargs: Any) -> LeNet5:
    """LeNet-5; the keyword arguments go to :class:`LeNet5`."""
    return LeNet5(**kwargs)
