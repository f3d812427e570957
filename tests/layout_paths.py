"""Inputs that take each addressing path of the [pixels x channels] kernels (pools, BatchNorm:
``kernels/nhwc.py``), and the record of the paths the launches took."""
import contextlib
from collections.abc import Iterator

import torch

from fastarch.kernels.launch import Launch
from fastarch.testing import random_input

# (channels, layout): dense channels_last with every channel block full (EVEN_C: 16 channels
# in one block of 16) and with a partial second block (144 = 128 + 16); and a channels_last
# view that is not dense (every other column), which takes the strided path (as NCHW does,
# which the other tests run throughout).
PATH_CASES = {
    "channels_last_c16": (16, "channels_last"),
    "channels_last_c144": (144, "channels_last"),
    "strided_channels_last_c16": (16, "strided"),
}


def path_input(shape: tuple[int, int, int, int], layout: str, device: str,
               requires_grad: bool = False) -> torch.Tensor:
    """A float32 tensor of ``shape`` in ``layout`` (a ``PATH_CASES`` layout)."""
    if layout == "channels_last":
        return random_input(shape, torch.float32, device, True, requires_grad=requires_grad)
    N, C, H, W = shape
    x = random_input((N, C, H, 2 * W), torch.float32, device, channels_last=True)[..., ::2]
    assert x.stride(1) == 1 and not x.is_contiguous(memory_format=torch.channels_last)
    return x.detach().requires_grad_(requires_grad)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """The launches that run inside the block, in order."""
    ran, run = [], Launch.__call__

    def record(launch: Launch) -> None:
        ran.append(launch)
        run(launch)

    Launch.__call__ = record
    try:
        yield ran
    finally:
        Launch.__call__ = run


def assert_paths(launches: list[Launch], channels: int, layout: str) -> None:
    """Every [pixels x channels] launch took the dense path exactly for dense channels_last
    tensors, and dropped the channel mask exactly when its channel block divides C (16
    channels fill a block of 16; 144 leave the second block of 128 partial)."""
    expected = (layout == "channels_last", channels == 16)
    paths = {(launch.name, launch.constexprs["DENSE_NHWC"], launch.constexprs["EVEN_C"])
             for launch in launches if "DENSE_NHWC" in launch.constexprs}
    assert paths, "no [pixels x channels] launch ran"
    wrong = [path for path in paths if path[1:] != expected]
    assert not wrong, f"expected (DENSE_NHWC, EVEN_C) = {expected}, got {wrong}"
