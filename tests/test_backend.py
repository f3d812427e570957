"""Backend selection: the suite runs our Triton kernels (interpreted on CPU, compiled on CUDA),
the documented torch fallback runs only where we do not accelerate, and outputs are poisoned."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend
from fastarch.kernels import max_pool


def test_suite_runs_the_triton_kernels(device):
    x = torch.randn(1, 2, 4, 4, device=device)
    assert backend.runs_triton(x)
    assert backend.use_triton("probe", x)
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        assert backend.INTERPRETER
        assert isinstance(max_pool.max_pool2d_forward_kernel, InterpretedFunction)


def test_kernel_outputs_are_poisoned_before_the_kernel_runs(device):
    assert backend.POISON_OUTPUTS
    assert torch.isnan(backend.empty((3, 2), torch.bfloat16, device)).all()
    assert (backend.empty((3,), torch.int8, device) == -128).all()


@pytest.mark.torch_fallback
def test_float64_falls_back_to_torch_and_is_counted(device):
    before = backend.fallback_counts["max_pool2d"]
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device)
    assert torch.equal(fastarch.functional.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert backend.fallback_counts["max_pool2d"] == before + 1


def test_cpu_without_interpreter_uses_the_documented_torch_fallback():
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import fastarch
        from fastarch import backend
        x = torch.randn(2, 3, 9, 9)
        assert not backend.runs_triton(x)
        assert torch.equal(fastarch.nn.MaxPool2d(3, 2)(x), F.max_pool2d(x, 3, 2))
        assert torch.equal(fastarch.nn.AvgPool2d(2)(x), F.avg_pool2d(x, 2))
        assert torch.equal(fastarch.nn.AdaptiveAvgPool2d(4)(x), F.adaptive_avg_pool2d(x, 4))
        print(sorted(backend.fallback_counts.items()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("[('adaptive_avg_pool2d', 1), ('avg_pool2d', 1), "
                                     "('max_pool2d', 1)]")
