"""fastarch: hand-written Triton kernels for LeNet-5, AlexNet and VGG."""
__version__ = "0.1.0"  # before the imports: the autotuning cache keys on it

from fastarch import backend, functional, nn  # noqa: E402
from fastarch.convert import convert  # noqa: E402

__all__ = ["backend", "convert", "functional", "nn"]
