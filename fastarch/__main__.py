"""Command line: ``python -m fastarch demo`` (the main job) and ``python -m fastarch sm90``.

``demo`` runs the pooling layers of LeNet-5, AlexNet and VGG through fastarch's Triton kernels,
forward and backward, checks them against float64 torch and times them. With a GPU the kernels
are compiled and the shapes are real; without one they run under the Triton interpreter on
small shapes (the process restarts itself with TRITON_INTERPRET=1, which must be set before
triton is imported).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# (layer, full-size input NCHW, interpreter-size input, op, kwargs)
DEMO_LAYERS = [
    ("LeNet-5 subsampling (avg 2x2)", (1024, 6, 28, 28), (8, 6, 28, 28), "avg_pool2d",
     dict(kernel_size=2, stride=2)),
    ("AlexNet pool1 (max 3x3 s2)", (256, 64, 55, 55), (2, 64, 55, 55), "max_pool2d",
     dict(kernel_size=3, stride=2)),
    ("AlexNet avgpool (adaptive 6x6)", (256, 256, 13, 13), (2, 256, 13, 13),
     "adaptive_avg_pool2d", dict(output_size=6)),
    ("VGG pool1 (max 2x2 s2)", (64, 64, 224, 224), (1, 64, 56, 56), "max_pool2d",
     dict(kernel_size=2, stride=2)),
]


def _restart_with_interpreter(enabled: bool) -> None:
    """Re-run this command with TRITON_INTERPRET set as asked, if it is not already."""
    current = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if current == enabled:
        return
    env = dict(os.environ)
    if enabled:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    os.execve(sys.executable, [sys.executable, "-m", "fastarch", *sys.argv[1:]], env)


def demo(dtype_name: str) -> int:
    gpu = torch.cuda.is_available()
    _restart_with_interpreter(not gpu)
    import torch.nn.functional as F

    import fastarch.functional as FF
    from fastarch.testing import tolerance

    dtype = getattr(torch, dtype_name)
    device = "cuda" if gpu else "cpu"
    mode = (f"compiled Triton on {torch.cuda.get_device_name()}" if gpu
            else "Triton interpreter on the CPU (no GPU here: small shapes)")
    print(f"fastarch demo: pooling layers, {dtype_name}, channels_last, {mode}\n")
    print(f"{'layer':34} {'input':>18} {'fwd max err':>12} {'bwd max err':>12} {'fwd+bwd ms':>11}"
          "  float64 check")
    failures = 0
    for name, full, small, op, kwargs in DEMO_LAYERS:
        shape = full if gpu else small
        x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        start = time.perf_counter()
        y = getattr(FF, op)(x, **kwargs)
        dy = torch.randn_like(y)
        y.backward(dy)
        if gpu:
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        x64 = x.detach().cpu().double().requires_grad_(True)
        y64 = getattr(F, op)(x64, **kwargs)
        y64.backward(dy.cpu().double())
        fwd_err = (y.detach().cpu().double() - y64).abs().max().item()
        bwd_err = (x.grad.cpu().double() - x64.grad).abs().max().item()
        rtol, atol = tolerance(dtype, reduction_length=9)
        agree = (torch.allclose(y.detach().cpu().double(), y64, rtol, atol)
                 and torch.allclose(x.grad.cpu().double(), x64.grad, rtol, atol))
        failures += not agree
        print(f"{name:34} {'x'.join(map(str, shape)):>18} {fwd_err:12.2e} {bwd_err:12.2e} "
              f"{elapsed_ms:11.2f}  {'ok' if agree else 'MISMATCH'}")
    print(f"\n{len(DEMO_LAYERS) - failures}/{len(DEMO_LAYERS)} layers agree with float64 torch "
          f"within the {dtype_name} tolerance (rtol {rtol:g}).")
    print("Timings include compilation on the first call; benchmarks/ has the real ones.")
    return 1 if failures else 0


def sm90() -> int:
    _restart_with_interpreter(False)
    from fastarch import sm90 as report
    return report.main(sys.argv[2:])


def profile() -> int:
    _restart_with_interpreter(not torch.cuda.is_available())
    from fastarch import profile as profiler
    return profiler.main(sys.argv[2:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="fastarch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="pooling layers through the Triton kernels")
    demo_parser.add_argument("--dtype", default="bfloat16",
                             choices=["float32", "float16", "bfloat16"])
    commands.add_parser("sm90", help="compile every kernel config for Hopper and report",
                        add_help=False)
    commands.add_parser("profile", help="per-layer times, rates and kernels of a model, and a "
                        "chrome trace (profile MODEL -h)", add_help=False)
    args, _ = parser.parse_known_args()
    if args.command == "demo":
        return demo(args.dtype)
    if args.command == "profile":
        return profile()
    return sm90()


if __name__ == "__main__":
    raise SystemExit(main())
