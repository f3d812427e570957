"""The demo's pieces that are not training (the training is test_convergence's): the progress
bar off a terminal, the throughput count and the step budget argument."""
import argparse
import io

import pytest

from fastarch import __main__ as cli


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
