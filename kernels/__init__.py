"""fastarch.kernels: the Triton kernels. One file per op family holds its ``@triton.jit``
kernels and the functions that build their launches (``launch.Launch``) from tensors and a
given ``launch.TileConfig``; the other modules hold what the families share. Nothing here
imports ``fastarch``: the host side (``fastarch.ops``) allocates, picks configs and launches."""
