"""The one ordered reduction of partial sums: split-K, per-tile and per-split partials are
added in their order, never with atomics, so the same input gives the same bits on every
run and every card."""
import triton
import triton.language as tl


@triton.jit
def sum_in_order(ptrs, mask, count, step):
    """The fp32 sum of the ``count`` (>= 1) blocks at ``ptrs``, ``ptrs + step``, ... (masked
    elements add nothing), added in that order."""
    total = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for _ in range(1, count):
        ptrs += step
        total += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return total
