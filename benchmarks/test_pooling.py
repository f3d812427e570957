"""Pooling forward and backward, fastarch vs PyTorch eager, in GB/s (bytes of the logical
input and output, each counted once: the same formula for both contenders)."""
import pytest
import torch
import torch.nn.functional as F

import fastarch.functional as FF
from timing import rotating, run_case

# name: (full shape, smoke shape, op name, op kwargs)
CASES = {
    "maxpool_2x2_s2_64x64x224x224": ((64, 64, 224, 224), (2, 8, 8, 8), "max_pool2d",
                                     dict(kernel_size=2, stride=2)),
    "maxpool_3x3_s2_128x64x55x55": ((128, 64, 55, 55), (2, 8, 11, 11), "max_pool2d",
                                    dict(kernel_size=3, stride=2)),
    "avgpool_2x2_s2_1024x6x28x28": ((1024, 6, 28, 28), (2, 6, 8, 8), "avg_pool2d",
                                    dict(kernel_size=2, stride=2)),
    "adaptive_avgpool_13_to_6_256x256": ((256, 256, 13, 13), (2, 8, 13, 13),
                                         "adaptive_avg_pool2d", dict(output_size=6)),
}
CONTENDERS = {"fastarch": FF, "eager": F}


def _input(shape, device, requires_grad=False):
    return (torch.randn(shape, device=device, dtype=torch.bfloat16)
            .to(memory_format=torch.channels_last).requires_grad_(requires_grad))


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", CASES)
def test_forward(benchmark, case, contender, bench_device, smoke):
    full, tiny, op_name, kwargs = CASES[case]
    op = getattr(CONTENDERS[contender], op_name)
    shape = tiny if smoke else full
    y_shape = getattr(F, op_name)(torch.empty(shape, device="meta"), **kwargs).shape
    element = torch.finfo(torch.bfloat16).bits // 8
    bytes_moved = (torch.Size(shape).numel() + y_shape.numel()) * element
    next_args = rotating(lambda: (_input(shape, bench_device),), bytes_moved)
    with torch.no_grad():
        run_case(benchmark, lambda x: op(x, **kwargs), next_args, bytes_moved, smoke,
                 contender, f"{case} forward")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", CASES)
def test_backward(benchmark, case, contender, bench_device, smoke):
    full, tiny, op_name, kwargs = CASES[case]
    op = getattr(CONTENDERS[contender], op_name)
    shape = tiny if smoke else full

    def make():
        x = _input(shape, bench_device, requires_grad=True)
        y = op(x, **kwargs)
        return x, y, torch.randn_like(y)

    element = torch.finfo(torch.bfloat16).bits // 8
    x, y, _ = make()
    bytes_moved = (x.numel() + y.numel()) * element
    del x, y
    run_case(benchmark, lambda x, y, dy: torch.autograd.grad(y, x, dy, retain_graph=True),
             rotating(make, bytes_moved), bytes_moved, smoke, contender, f"{case} backward")
