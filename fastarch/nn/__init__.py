"""Drop-in torch.nn modules: same constructor, parameters, buffers, state_dict and
extra_repr as their twins (they subclass them); only ``forward`` runs our kernels."""
from fastarch.nn.activation import ReLU
from fastarch.nn.batchnorm import BatchNorm2d
from fastarch.nn.conv import Conv2d
from fastarch.nn.dropout import Dropout
from fastarch.nn.fused import ConvBatchNormReLU, FusedSequential
from fastarch.nn.linear import Linear
from fastarch.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from fastarch.nn.syncbatchnorm import SyncBatchNorm

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "ConvBatchNormReLU",
           "Dropout", "FusedSequential", "Linear", "MaxPool2d", "ReLU", "SyncBatchNorm"]
