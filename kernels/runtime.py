"""What the kernels need to know about the process they run in, in one place: whether Triton
interprets them (``TRITON_INTERPRET=1``, set before Triton is imported: the tests and the CPU
demo) and how large its tiles may be there, how outputs are allocated (poisoned with NaN when
``FASTARCH_POISON_OUTPUTS=1``, so an element a kernel forgets to write fails its test), the
memory format an output takes, and how many SMs a split reduction should fill."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

POISON_OUTPUTS: bool = os.environ.get("FASTARCH_POISON_OUTPUTS", "0") == "1"

# The elements an interpreted tile may hold (``launch.interpreter_tile``). Large, because the
# interpreter's cost is per program and loop iteration; the tests set a small one, so that
# their tiny shapes still run every multi-program path (partial merges, split reductions).
DEFAULT_INTERPRETER_TILE_ELEMENTS = 1 << 18
INTERPRETER_TILE_ELEMENTS: int = int(os.environ.get("FASTARCH_INTERPRETER_TILE_ELEMENTS",
                                                    DEFAULT_INTERPRETER_TILE_ELEMENTS))

# Hopper's SM count (H100/H200 SXM): what split reductions size their grids for where no
# device can be asked (the interpreter, the compile check's meta tensors).
DEFAULT_SM_COUNT = 132


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Allocate a kernel output (poisoned when ``POISON_OUTPUTS`` is set: NaN, or the most
    negative integer for integral dtypes)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored NHWC-dense (and not also NCHW-dense), else
    contiguous: the format an output of ``tensor``'s op takes, as torch's do. A tensor is
    dense in its format exactly when ``tensor.is_contiguous(memory_format=...)`` of it holds."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) \
            and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def sm_count(device: torch.device) -> int:
    """The SMs of ``device`` (``DEFAULT_SM_COUNT`` off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT
