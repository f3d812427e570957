"""The geometry every convolution kernel shares (forward, dgrad, wgrad)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution window, groups=1.

    ``padding`` is the top/left padding. ``padding_end`` is the bottom/right padding; it
    differs from ``padding`` only for padding='same' with an even effective kernel, where
    torch pads the extra row/column at the end.
    """
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_end: tuple[int, int] | None = None

    def end_padding(self) -> tuple[int, int]:
        return self.padding if self.padding_end is None else self.padding_end

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        pad_end = self.end_padding()
        return tuple(
            (size + begin + end - dilation * (k - 1) - 1) // stride + 1
            for size, begin, end, k, stride, dilation in zip(
                (height, width), self.padding, pad_end, self.kernel, self.stride, self.dilation))
