"""fastarch: hand-written Triton kernels for LeNet-5, AlexNet and VGG."""
from fastarch import backend, functional, nn

__all__ = ["backend", "functional", "nn"]
__version__ = "0.1.0"
