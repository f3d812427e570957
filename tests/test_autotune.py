"""Autotuning on the CPU with a fake clock: the cache is written, reread and keyed right,
pruned candidates never run, nothing is timed under capture or tracing, and a trial never
touches the caller's outputs or state (in-place outputs, running statistics, dropout)."""
import json
import multiprocessing

import pytest
import torch
import triton

import fastarch
from fastarch import autotune
from fastarch.autotune import ARCH_PROFILES, TileConfig
from fastarch.kernels.launch import Extent, Launch

STATIC = TileConfig("static", 64, 64, 64, num_warps=4, num_stages=3)
# On an sm_89 profile (99 KiB): "fast" and "huge" would win, but "huge" does not fit.
FAST = TileConfig("fast", 64, 128, 64, num_warps=4, num_stages=3)        # 72 KiB in bf16
HUGE = TileConfig("huge", 128, 256, 64, num_warps=8, num_stages=4)       # 192 KiB in bf16
SLOW = TileConfig("slow", 32, 32, 64, num_warps=4, num_stages=2)
TIMES = {"static": 2.0, "fast": 1.0, "huge": 0.5, "slow": 3.0}


class FakeClock:
    """Runs each trial once and reports the time its tile name is given in ``TIMES``."""

    def __init__(self):
        self.timed: list[str] = []

    def trial(self, tile: TileConfig):
        self.timed.append(tile.name)
        return lambda: None

    def __call__(self, run) -> float:
        run()
        return TIMES[self.timed[-1]]


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Tuning allowed on the CPU (as on a GPU), the cache in a fresh directory, a fake clock
    that runs every trial once."""
    monkeypatch.setenv("FASTARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "on")
    monkeypatch.setattr(autotune, "runs_kernels", lambda device: True)
    clock = FakeClock()
    monkeypatch.setattr(autotune, "TIMER", clock)
    autotune.forget_loaded_caches()
    yield clock
    autotune.forget_loaded_caches()


def _choose(clock, dtype=torch.bfloat16, shape=None, candidates=(FAST, HUGE, SLOW), trial=None):
    return autotune.choose("family", shape or {"C": 64}, dtype, "channels_last",
                           torch.device("cpu"), STATIC, lambda generation: candidates,
                           trial or clock.trial)


def _cache_file(tmp_path):
    (path,) = tmp_path.glob("autotune-*.json")
    return path


def test_the_winner_is_cached_on_disk_and_reread_without_timing(tuning, tmp_path):
    assert _choose(tuning) == HUGE
    assert sorted(tuning.timed) == ["fast", "huge", "slow", "static"]
    entries = json.loads(_cache_file(tmp_path).read_text())
    (key,) = entries
    assert key.startswith("family[C=64] bfloat16 channels_last")
    assert f"triton={triton.__version__}" in key and f"fastarch={fastarch.__version__}" in key
    assert entries[key]["config"] == "huge"
    assert entries[key]["times_ms"] == {name: TIMES[name] for name in TIMES}
    assert _cache_file(tmp_path).name == f"autotune-{ARCH_PROFILES['sm_90a'].slug}.json"

    autotune.forget_loaded_caches()  # a new process: only the file remembers

    def no_timing(tile):
        raise AssertionError("a cached key was timed again")
    assert _choose(tuning, trial=no_timing) == HUGE


def test_every_key_part_separates_entries(tuning, tmp_path):
    _choose(tuning)
    _choose(tuning, dtype=torch.float16)
    _choose(tuning, shape={"C": 128})
    assert len(json.loads(_cache_file(tmp_path).read_text())) == 3
    assert len(tuning.timed) == 12


def test_pruned_candidates_are_never_run(tuning, monkeypatch):
    monkeypatch.setattr(autotune, "device_profile", lambda device: ARCH_PROFILES["sm_89"])
    assert _choose(tuning) == FAST
    assert "huge" not in tuning.timed
    assert not autotune.fits(HUGE, 2, ARCH_PROFILES["sm_89"])
    assert autotune.fits(HUGE, 2, ARCH_PROFILES["sm_90a"])


def test_on_times_at_most_six_candidates_and_max_times_all(tuning, monkeypatch):
    many = tuple(TileConfig(f"t{i}", 64, 16 * (i % 4 + 1), 32, 4, 2) for i in range(9))
    TIMES.update({tile.name: 5.0 for tile in many})
    try:
        _choose(tuning, candidates=many)
        assert len(tuning.timed) == autotune.ON_CANDIDATES
        monkeypatch.setenv("FASTARCH_AUTOTUNE", "max")
        tuning.timed.clear()
        _choose(tuning, candidates=many, shape={"C": 32})
        assert len(tuning.timed) == 10
    finally:
        for tile in many:
            del TIMES[tile.name]


def test_off_uses_the_static_table_and_touches_no_file(tuning, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "off")
    assert _choose(tuning) == STATIC
    assert not tuning.timed and not list(tmp_path.iterdir())


def test_a_bad_mode_names_the_variable(tuning, monkeypatch):
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="FASTARCH_AUTOTUNE"):
        _choose(tuning)


def test_a_failing_candidate_loses(tuning):
    def trial(tile):
        if tile.name == "huge":
            raise RuntimeError("out of resource: shared memory")
        return tuning.trial(tile)
    assert _choose(tuning, trial=trial) == FAST


def _block(patch, blocker: str) -> None:
    if blocker == "compiling":
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("blocker", ["compiling", "capturing"])
def test_nothing_is_timed_while_tracing_or_capturing(tuning, monkeypatch, blocker):
    with monkeypatch.context() as patch:
        _block(patch, blocker)
        assert _choose(tuning) == STATIC and not tuning.timed
    assert _choose(tuning, shape={"C": 16}) == HUGE  # tuned outside: used inside
    tuning.timed.clear()
    with monkeypatch.context() as patch:
        _block(patch, blocker)
        assert _choose(tuning, shape={"C": 16}) == HUGE and not tuning.timed


def _store_many(path, worker: int) -> None:
    for i in range(20):
        autotune.TuningCache(path).store(f"key{worker}-{i}", STATIC, {"static": 1.0})


def test_processes_sharing_the_cache_keep_every_entry(tmp_path):
    path = tmp_path / "autotune-shared.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_store_many, args=(path, w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(worker.exitcode == 0 for worker in workers)
    assert len(json.loads(path.read_text())) == 60
    assert not list(tmp_path.glob("*.tmp"))


def test_scratch_run_never_writes_the_given_tensors():
    out = torch.zeros(8)
    view = out[2:]

    def fill(**kwargs):
        kwargs["y"].fill_(7.0)

    class Kernel:
        __name__ = "fill"

        def __getitem__(self, grid):
            return lambda **kwargs: fill(**kwargs)

    launch = Launch(Kernel(), (1,), {"y": view}, {}, {"y": Extent((6,), (1,))})
    autotune.scratch_run([launch], (out,))()
    assert torch.equal(out, torch.zeros(8))
    launch()
    assert torch.equal(out[2:], torch.full((6,), 7.0))


# ----------------------------------------------------------------------------- real kernels

@pytest.fixture
def tuning_kernels(tuning):
    """Tuning on with the interpreter standing in for a GPU (GPU candidate tiles on tiny
    tensors) and a clock that runs each trial once."""
    calls = []

    def clock(run):
        calls.append(run)
        run()
        return float(len(calls) % 3)
    autotune.TIMER = clock
    return calls


def _untuned(monkeypatch, fn):
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "off")
    try:
        return fn()
    finally:
        monkeypatch.setenv("FASTARCH_AUTOTUNE", "on")


def test_inplace_dropout_and_relu_run_once_per_call(tuning_kernels, monkeypatch):
    x = torch.randn(4, 8, 6, 6)

    def run():
        torch.manual_seed(0)
        y = x.clone()
        fastarch.functional.dropout(y, 0.5, training=True, inplace=True)
        fastarch.functional.relu(y, inplace=True)
        return y
    expected = _untuned(monkeypatch, run)
    assert torch.equal(run(), expected)
    assert len(tuning_kernels) >= 2  # dropout's and relu's candidates really ran


def test_batch_norm_running_statistics_move_once_per_call(tuning_kernels):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5, 5).to(memory_format=torch.channels_last)
    ours, theirs = fastarch.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    ours.train(), theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert ours.num_batches_tracked.item() == 1
    assert tuning_kernels


def test_tuned_conv_matches_torch(tuning_kernels, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64).float().requires_grad_()
    conv = fastarch.nn.Conv2d(32, 32, 3, padding=1)  # 32 wide: candidates beside the static
    reference = torch.nn.Conv2d(32, 32, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    y = conv(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(y, reference(x_ref), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-3, atol=1e-2)
    families = {key.split("[")[0] for key in json.loads(_cache_file(tmp_path).read_text())}
    assert {"conv2d_forward", "conv2d_dgrad", "conv2d_wgrad"} <= families


def test_tuned_linear_matches_torch(tuning_kernels, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.float64).float().requires_grad_()
    linear = fastarch.nn.Linear(32, 128)  # 128 wide: a candidate beside the static
    reference = torch.nn.Linear(32, 128)
    reference.load_state_dict(linear.state_dict())
    y = linear(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)
    families = {key.split("[")[0] for key in json.loads(_cache_file(tmp_path).read_text())}
    assert "linear_gemm" in families


def test_tuned_fused_conv_batch_norm_training_matches_torch(tuning_kernels, tmp_path):
    """The conv writes Welford partials (only tiles of the static height are tried) and the
    running statistics move once."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(fastarch.nn.Conv2d(32, 32, 3, padding=1),
                               fastarch.nn.BatchNorm2d(32), fastarch.nn.ReLU())
    theirs = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1),
                                 torch.nn.BatchNorm2d(32), torch.nn.ReLU())
    theirs.load_state_dict(ours.state_dict())
    fastarch.fusion.fuse(ours)
    x = torch.randn(2, 32, 6, 6).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours[1], name), getattr(theirs[1], name),
                                   rtol=1e-3, atol=1e-4)
    keys = json.loads(_cache_file(tmp_path).read_text())
    assert any(key.startswith("conv2d_forward[") and "+stats" in key for key in keys)


def test_a_static_tile_the_device_cannot_hold_gives_way_to_one_it_can(tuning, monkeypatch):
    """Off, or while capturing, on an Ada-sized profile: the first candidate that fits."""
    monkeypatch.setattr(autotune, "device_profile", lambda device: ARCH_PROFILES["sm_89"])
    static = autotune.choose("family", {"C": 8}, torch.bfloat16, "channels_last",
                             torch.device("cpu"), HUGE, lambda generation: (FAST, SLOW),
                             tuning.trial)
    assert static == FAST  # timed: fast beats slow
    monkeypatch.setenv("FASTARCH_AUTOTUNE", "off")
    assert autotune.choose("family", {"C": 9}, torch.bfloat16, "channels_last",
                           torch.device("cpu"), HUGE, lambda generation: (SLOW, FAST),
                           tuning.trial) == SLOW
