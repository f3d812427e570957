"""The demo (``python -m fastarch demo``): a short run end to end against torch.nn, the
interpreter's learning-rate schedule, the progress bar off a terminal, the throughput count
and the step budget argument. How far the training gets is test_convergence's."""
import argparse
import dataclasses
import io
import re
import sys

import pytest
import torch

from fastarch import __main__ as cli
from fastarch import digits
from model_cases import ieee_fp32


@pytest.mark.slow
@pytest.mark.usefixtures("shipped_interpreter_tiles")  # as the demo runs
def test_a_short_demo_matches_torch_nn(monkeypatch, capsys):
    """Two training steps of the demo's recipe, then 48 held-out images in two batches: the
    report's losses and accuracy are torch.nn's, trained from the same weights on the same
    batches (in IEEE fp32, so that on a GPU neither rounds to TF32 its own way)."""
    load = digits.load_digits_32x32

    def fewer_test_images(seed: int = 0) -> digits.Digits:
        data = load(seed)
        return dataclasses.replace(data, test_images=data.test_images[:48],
                                   test_labels=data.test_labels[:48])

    monkeypatch.setattr(digits, "load_digits_32x32", fewer_test_images)
    monkeypatch.setattr(cli, "INTERPRETER_TEST_BATCH", 32)
    monkeypatch.setattr(sys, "argv", ["fastarch", "demo", "--steps", "2"])
    with ieee_fp32():
        assert cli.main() == 0

    out, err = capsys.readouterr()
    ours = re.search(r"test accuracy: +([\d.]+) % \((\d+) of 48 held-out", out)
    theirs = re.search(r"torch\.nn LeNet-5: +([\d.]+) % \((\d+) of 48\)", out)
    losses = re.search(r"training loss: +([\d.]+) at the first step, ([\d.]+) at the last "
                       r"\(torch\.nn: ([\d.]+), ([\d.]+)\)", out)
    assert ours and theirs and losses, out
    assert ours.groups() == theirs.groups()
    first, last, torch_first, torch_last = map(float, losses.groups())
    assert first == pytest.approx(torch_first, abs=1e-3)  # printed to three decimals
    assert last == pytest.approx(torch_last, abs=1e-3)
    assert 2.0 < first < 2.6  # about ln 10: ten classes, untrained
    assert f"train [{'#' * cli.ProgressBar.WIDTH}] 2/2" in err
    assert f"test  [{'#' * cli.ProgressBar.WIDTH}] 48/48" in err


def test_the_interpreter_schedule_holds_the_lr_then_decays_it_to_zero():
    recipe = dataclasses.replace(digits.INTERPRETER_RUN, steps=10, lr=1.0)
    optimizer, schedule = digits.optimizer_for(torch.nn.Linear(1, 1), recipe)
    lrs = []
    for _ in range(recipe.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert recipe.schedule is digits.Schedule.HOLD_THEN_DECAY
    assert lrs == pytest.approx([1.0] * 8 + [2 / 3, 1 / 3])  # the last 30 %: 1, 2/3, 1/3


def test_progress_bar_writes_a_line_at_each_tenth_off_a_terminal():
    stream = io.StringIO()
    bar = cli.ProgressBar("train", 440, stream)
    for done in range(1, 441):
        bar.update(done, f"loss {1 / done:.3f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # 1/440 (the first tenth begins) and one per tenth after it
    assert lines[-1].startswith("train [" + "#" * cli.ProgressBar.WIDTH + "] 440/440  loss")
    assert "\r" not in stream.getvalue()


def test_throughput_counts_from_the_end_of_the_first_step(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 12.0])  # a 10 s first step (compilation), then 1 s steps
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    throughput = cli.Throughput(batch_size=64)
    throughput.tick()
    assert throughput.images_per_s() == pytest.approx(6.4)  # one step: the only one there is
    throughput.tick()
    throughput.tick()
    assert throughput.images_per_s() == pytest.approx(64.0)


@pytest.mark.parametrize("text", ["0", "-3"])
def test_the_step_budget_must_be_positive(text):
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        cli._positive_int(text)
