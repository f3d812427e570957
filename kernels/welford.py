"""Per-channel Welford statistics (count, mean, M2) in fp32, formed around a pivot (a tile's
plain mean, the fullest tile's mean) and merged with Chan's formula. Summing
values or count * mean directly keeps only the magnitude of a large mean and loses its spread
(a channel of mean 1e4 and std 1 sums to ~1e6 per 128 rows, where fp32 resolves 0.06), and a
running mean near 1e4 rounds by half an ulp (4.9e-4) at every update; deviations from the
pivot are small, exact to form, and lose nothing. Only ``pivot + offset`` rounds, once."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def tile_statistics(values, rows_ok, ROWS: tl.constexpr):
    """(mean, M2) per column of the valid rows of a [ROWS, columns] fp32 block (row 0 valid),
    in two passes: the plain mean is the pivot, and the deviations from it correct it, so the
    mean is exact to fp32 both when it dwarfs the spread (1e4 +- 1: the plain sum alone loses
    the spread) and when the spread dwarfs it (a pivot far from the mean would put its
    magnitude into every deviation). M2 from the deviations, never E[x^2] - E[x]^2."""
    count = tl.sum(rows_ok.to(tl.float32), axis=0)
    pivot = tl.sum(tl.where(rows_ok[:, None], values, 0.0), axis=0) / count
    shifted = tl.where(rows_ok[:, None], values - pivot[None, :], 0.0)
    mean = pivot + tl.sum(shifted, axis=0) / count
    deviation = tl.where(rows_ok[:, None], values - mean[None, :], 0.0)
    return mean, tl.sum(deviation * deviation, axis=0)


@triton.jit
def chan_merge(count, offset, m2, ok):
    """(n, offset, M2) per column from [rows, columns] partials (count, mean less a common
    pivot, M2), rows where ``ok`` is false adding nothing."""
    count = tl.where(ok, count, 0.0)
    n = tl.sum(count, axis=0)
    merged = tl.sum(count * tl.where(ok, offset, 0.0), axis=0) / tl.maximum(n, 1.0)
    deviation = tl.where(ok, offset - merged[None, :], 0.0)
    merged_m2 = tl.sum(tl.where(ok, m2, 0.0), axis=0) + tl.sum(count * deviation * deviation,
                                                                axis=0)
    return n, merged, merged_m2


@triton.jit
def store_statistics(partials_ptr, plane, offsets, count, mean, m2, mask):
    """Store (count, mean, M2) at ``offsets`` of the three [plane]-element planes of a
    [3, tiles, C] fp32 partials buffer."""
    tl.store(partials_ptr + offsets, tl.zeros_like(mean) + count, mask=mask)
    tl.store(partials_ptr + plane + offsets, mean, mask=mask)
    tl.store(partials_ptr + 2 * plane + offsets, m2, mask=mask)


# ----------------------------------------------------------------------------- host side

class WelfordPartials(NamedTuple):
    """Per-M-tile BatchNorm statistics of a conv output, each [M tiles, K_out] fp32."""
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def merge_welford_partials(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                           unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, variance) from [tiles, channels] partials, Chan's parallel formula
    over all tiles at once: M2 = sum M2_i + sum n_i (mean_i - mean)^2, the mean summed as
    deviations from the fullest tile's (as ``welford.chan_merge``). Deterministic."""
    total = count.sum(0)
    pivot = mean.gather(0, count.argmax(0, keepdim=True))
    merged_mean = pivot[0] + (count * (mean - pivot)).sum(0) / total
    merged_m2 = m2.sum(0) + (count * (mean - merged_mean).square()).sum(0)
    return merged_mean, merged_m2 / (total - 1 if unbiased else total)
