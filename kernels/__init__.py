"""fastarch.kernels: pure Triton. One file per kernel family: the ``@triton.jit`` kernels,
then a thin launcher (shapes, strides, grid, config). Nothing here imports ``fastarch.nn``."""
