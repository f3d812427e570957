"""LeNet-5, AlexNet, VGG and ResNet built from ``fastarch.nn`` modules only; the state_dict
keys and shapes are torchvision's (and the lecture notes' for LeNet-5 and the compact
AlexNet), so checkpoints load unchanged. Every builder returns the model fused
(``fastarch.fusion``); the keyword-only ``fused=False`` runs it module by module."""
from fastarch.models.alexnet import AlexNet, CompactAlexNet, alexnet, compact_alexnet
from fastarch.models.lenet import LeNet5, lenet5
from fastarch.models.resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34,
                                    resnet50, resnet101, resnet152)
from fastarch.models.vgg import (VGG, make_layers, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16,
                                 vgg16_bn, vgg19, vgg19_bn)

__all__ = ["AlexNet", "BasicBlock", "Bottleneck", "CompactAlexNet", "LeNet5", "ResNet", "VGG",
           "alexnet", "compact_alexnet", "lenet5", "make_layers", "resnet18", "resnet34",
           "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
           "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
