"""Command line: ``python -m fastarch demo`` (the main job), ``layers``, ``profile``,
``compile-report``, ``ledger``.

``demo`` trains LeNet-5 on scikit-learn's handwritten digits with fastarch's Triton kernels and
reports test accuracy and training throughput. With a GPU it runs the full training (20
epochs, fp32); without one the same kernels run under the Triton interpreter (the process
restarts itself with TRITON_INTERPRET=1, which must be set before triton is imported) on a
small budget that finishes in under two minutes.

``layers`` runs every distinct layer of LeNet-5, AlexNet and VGG16-BN forward and backward,
checks it against float64 torch and times it (``fastarch.layers``: real shapes on a GPU, small
ones without).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Optional, TextIO

import torch

if TYPE_CHECKING:
    from fastarch.digits import Digits, Recipe

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


# ----------------------------------------------------------------------------- demo

# Every held-out image is classified, 512 at a time on a GPU. The interpreter pays a fixed
# cost per launch and per program, so few large batches are fastest; three keep the progress
# bar moving.
INTERPRETER_TEST_BATCH = 128
GPU_TEST_BATCH = 512


class ProgressBar:
    """A text progress bar on stderr: redrawn in place on a terminal, elsewhere (a log, CI)
    one line at each tenth of the way."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None) -> None:
        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream  # stderr as it is now
        self.tty = self.stream.isatty()
        self.tenths_shown = -1

    def update(self, done: int, status: str = "") -> None:
        tenths = done * 10 // self.total
        if not self.tty and tenths == self.tenths_shown:
            return
        self.tenths_shown = tenths
        filled = done * self.WIDTH // self.total
        line = (f"{self.label:5} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{done:>{len(str(self.total))}}/{self.total}  {status}").rstrip()
        if self.tty:
            line = "\r" + line + "\033[K" + ("\n" if done == self.total else "")
        else:
            line += "\n"
        sys.stdout.flush()  # keep the report's order when stdout is a pipe
        self.stream.write(line)
        self.stream.flush()


class Throughput:
    """Training images per second, counted from the end of the first step (which compiles
    the kernels on a GPU) when there is more than one step."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.ticks = [time.perf_counter()]

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def images_per_s(self) -> float:
        first = 1 if len(self.ticks) > 2 else 0
        steps = len(self.ticks) - 1 - first
        return steps * self.batch_size / (self.ticks[-1] - self.ticks[first])

    def counted_steps(self) -> str:
        return "after the first step" if len(self.ticks) > 2 else "one step"


def _describe_run(gpu: bool, recipe: Recipe, data: Digits) -> None:
    from fastarch import backend, digits
    from fastarch.kernels.tensor_cores import Operand

    n_train = len(data.train_labels)
    where = (f"compiled Triton on {torch.cuda.get_device_name()}" if gpu else
             "the Triton interpreter on the CPU (no GPU found): the real kernels, run in numpy")
    conv_tf32 = backend.conv_operand(torch.float32) is Operand.TF32
    matmul_tf32 = backend.matmul_operand(torch.float32) is Operand.TF32
    tf32 = (f"TF32 convolutions {'on' if conv_tf32 else 'off'}, "
            f"TF32 matmuls {'on' if matmul_tf32 else 'off'}")
    print("fastarch demo: LeNet-5 on scikit-learn's handwritten digits "
          f"({n_train + len(data.test_labels)} real 8x8 scans scaled to 32x32)")
    print(f"  kernels:  {where}")
    print(f"  training: {recipe.steps} steps of {recipe.batch_size} images "
          f"({recipe.steps * recipe.batch_size / n_train:.2g} epochs of {n_train}), "
          f"AdamW, {recipe.describe_schedule()}, float32 ({tf32})")
    if not gpu:
        full = digits.FULL_RUN
        print("  budget:   small, so that it finishes in under 2 minutes; a GPU trains "
              f"{full.steps} steps of {full.batch_size} "
              f"({full.steps * full.batch_size / n_train:.2g} epochs)")
    print()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _one_blas_thread(gpu: bool) -> contextlib.AbstractContextManager:
    """Without a GPU, numpy's BLAS held to one thread: the interpreter's matrix products (a
    few thousand rows by 16 to 128) are too small to share, and pool threads spinning
    between them take cores from the interpreter and from other jobs (on a loaded 2-core
    machine a training step cost 3.3 s of CPU with the pool, 2.0 s without)."""
    if gpu:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    return threadpool_limits(limits=1, user_api="blas")


def _train_and_test(model: torch.nn.Module, data: Digits, recipe: Recipe, seed: int,
                    test_batch: int) -> tuple[list[float], Throughput, float]:
    """Train ``model`` with progress bars; its losses, throughput and test accuracy."""
    from fastarch import digits

    bar, clock = ProgressBar("train", recipe.steps), Throughput(recipe.batch_size)

    def on_step(step: int, loss: float) -> None:
        clock.tick()
        bar.update(step + 1, f"loss {loss:.3f}  {clock.images_per_s():.1f} images/s")

    losses = digits.train(model, data, recipe, seed, on_step)
    test_bar = ProgressBar("test", len(data.test_labels))
    score = digits.accuracy(model, data.test_images, data.test_labels, test_batch,
                            test_bar.update)
    return losses, clock, score


def demo(steps: Optional[int], seed: int) -> int:
    """Train LeNet-5 on the digits with fastarch, then torch.nn's from the same weights on
    the same batches; 1 when a full run misses its accuracy."""
    gpu = torch.cuda.is_available()
    _restart_with_interpreter(not gpu)
    from fastarch import digits, models

    started = time.perf_counter()
    device = "cuda" if gpu else "cpu"
    recipe = digits.FULL_RUN if gpu else digits.INTERPRETER_RUN
    full_run = gpu and steps is None
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    data = digits.load_digits_32x32().to(device)
    _describe_run(gpu, recipe, data)

    torch.manual_seed(seed)
    model = models.lenet5().to(device)
    reference = digits.torch_lenet5().to(device)
    reference.load_state_dict(model.state_dict())
    with _one_blas_thread(gpu):
        losses, clock, score = _train_and_test(model, data, recipe, seed,
                                               GPU_TEST_BATCH if gpu else INTERPRETER_TEST_BATCH)
    elapsed = time.perf_counter() - started
    reference_losses = digits.train(reference, data, recipe, seed)
    reference_score = digits.accuracy(reference, data.test_images, data.test_labels)

    n_test = len(data.test_labels)
    print(f"\ntest accuracy:       {100 * score:.1f} % ({round(score * n_test)} of {n_test} "
          f"held-out images; chance is 10 %)")
    print(f"torch.nn LeNet-5:    {100 * reference_score:.1f} % ({round(reference_score * n_test)} "
          f"of {n_test}), trained from the same weights on the same batches")
    print(f"training loss:       {losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last "
          f"(torch.nn: {reference_losses[0]:.3f}, {reference_losses[-1]:.3f})")
    print(f"training throughput: {clock.images_per_s():.1f} images/s (forward, backward and "
          f"AdamW step; {clock.counted_steps()})")
    print(f"trained and tested in {elapsed:.0f} s"
          + ("" if gpu else " (the interpreter's budget: under 2 minutes)"))
    if full_run and score < digits.TARGET_ACCURACY:
        print(f"below the {100 * digits.TARGET_ACCURACY:.0f} % a full run must reach")
        return 1
    return 0


# ----------------------------------------------------------------------------- layers

def layers() -> int:
    _restart_with_interpreter(not torch.cuda.is_available())
    from fastarch import layers as command
    return command.main(sys.argv[2:])


def compile_report() -> int:
    _restart_with_interpreter(False)
    from fastarch.compile_report import cli
    return cli.main(sys.argv[2:])


def profile() -> int:
    _restart_with_interpreter(not torch.cuda.is_available())
    from fastarch import profile as profiler
    return profiler.main(sys.argv[2:])


def ledger() -> int:
    _restart_with_interpreter(False)  # the launches a GPU gets, not the interpreter's tiles
    from fastarch import ledger as command
    return command.main(sys.argv[2:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="fastarch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train LeNet-5 on handwritten digits "
                                      "with the Triton kernels (the main job)")
    demo_parser.add_argument("--steps", type=_positive_int, default=None,
                             help="training steps (default: the full run on a GPU, a small "
                             "budget without one)")
    demo_parser.add_argument("--seed", type=int, default=0)
    commands.add_parser("layers", help="every distinct layer of the three models through the "
                        "Triton kernels, checked against float64 torch (layers -h)",
                        add_help=False)
    commands.add_parser("compile-report", help="compile every kernel config for sm_80, sm_89 "
                        "or sm_90a without a GPU and check it (compile-report -h)",
                        add_help=False)
    commands.add_parser("profile", help="per-layer times, rates and kernels of a model, and a "
                        "chrome trace (profile MODEL -h)", add_help=False)
    commands.add_parser("ledger", help="bytes every kernel of a forward or training step "
                        "reads and writes, fastarch against eager, from shapes alone "
                        "(ledger MODEL -h)", add_help=False)
    args, _ = parser.parse_known_args()
    if args.command == "demo":
        return demo(args.steps, args.seed)
    if args.command == "layers":
        return layers()
    if args.command == "profile":
        return profile()
    if args.command == "ledger":
        return ledger()
    return compile_report()


if __name__ == "__main__":
    raise SystemExit(main())
