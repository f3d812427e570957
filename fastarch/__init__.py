"""fastarch: hand-written Triton kernels for LeNet-5, AlexNet and VGG."""
from fastarch import backend, functional, nn
from fastarch.convert import convert

__all__ = ["backend", "convert", "functional", "nn"]
__version__ = "0.1.0"
