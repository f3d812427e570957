"""The harness: on a machine without a GPU the kernels run on CPU tensors under the Triton
interpreter, which must be switched on before triton is imported; with a GPU the same tests
run compiled kernels on CUDA. Every kernel output is NaN-poisoned before the kernel runs."""
import os
import tempfile

# Inductor's on-disk graph cache does not key on a custom operator's shape function, so a
# cache left by an earlier checkout could replay a graph built from other shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastarch-inductor-"))
# Inductor compiles in a pool of worker processes, each of which imports torch (seconds of
# CPU per test process); the tests' few small graphs compile faster in process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["FASTARCH_POISON_OUTPUTS"] = "1"
# Interpreted tiles of at most 8192 elements: test-sized layers still split into several
# programs, steps and partials, so every multi-program path runs.
os.environ["FASTARCH_INTERPRETER_TILE_ELEMENTS"] = "8192"
# On a GPU the tests check the static tables' tiles (test_autotune checks the tuning): no
# candidate timing in the GPU check's test stage, no cache file written.
os.environ.setdefault("FASTARCH_AUTOTUNE", "off")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fastarch import backend  # noqa: E402
from fastarch.kernels import launch, runtime  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def shipped_interpreter_tiles(monkeypatch) -> None:
    """Interpreted tiles of the shipped size (the demo's) instead of the tests' 8192, for the
    end-to-end training runs: they check training, not the multi-program paths (the kernel
    tests do that), and run at a fraction of the cost."""
    monkeypatch.setattr(launch, "INTERPRETER_TILE_ELEMENTS",
                        runtime.DEFAULT_INTERPRETER_TILE_ELEMENTS)


@pytest.fixture
def process_group():
    """A one-process gloo group, for one test: what SyncBatchNorm's operator runs on (over
    every process of a group, here its only one)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def kernels_run(monkeypatch) -> list[str]:
    """The names of the jit kernels every ``Launch`` runs during the test, in order."""
    names: list[str] = []
    call = launch.Launch.__call__

    def recording(self) -> None:
        names.append(self.kernel.__name__)
        call(self)
    monkeypatch.setattr(launch.Launch, "__call__", recording)
    return names


@pytest.fixture(autouse=True)
def seeded() -> None:
    """A fixed seed per test: fresh random data, reproducible failures."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_silent_fallback(request):
    """A test exercises our kernels unless it says otherwise: any torch fallback fails it."""
    before = dict(backend.fallback_counts)
    yield
    if request.node.get_closest_marker("torch_fallback") is None:
        assert dict(backend.fallback_counts) == before, (
            f"ran torch's fallback instead of a Triton kernel: {dict(backend.fallback_counts)}")


# The GPU check (benchmarks/gpu_check.sh) runs a subset that fits its minutes: the tests marked
# gpu_check, each in its first parametrization of every dtype and layout (compiles dominate).
VARIANT_IDS = ("fp32", "tf32", "bf16", "fp16", "float32", "bfloat16", "float16", "float64",
               "nchw", "nhwc")


def pytest_addoption(parser):
    parser.addoption("--gpu-check", action="store_true",
                     help="only the tests marked gpu_check, each in the first parametrization "
                          "of every dtype and layout (benchmarks/gpu_check.sh)")


def pytest_ignore_collect(collection_path, config):
    """--gpu-check: a test file that never names the gpu_check mark has nothing to select, so
    it is not even imported (test_opinfo's import of torch's OpInfo database alone takes
    seconds)."""
    if (config.getoption("--gpu-check") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and "gpu_check" not in collection_path.read_text()):
        return True
    return None


def _variant_of(item) -> tuple[str, ...]:
    """The dtype and layout in a parametrized test's id (e.g. ("bf16", "nhwc"))."""
    callspec = getattr(item, "callspec", None)
    tokens = callspec.id.split("-") if callspec is not None else []
    return tuple(token for token in tokens if token in VARIANT_IDS)


def pytest_collection_modifyitems(config, items):
    # The longest tests first, so that xdist's workers finish together.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not config.getoption("--gpu-check"):
        return
    kept, seen, dropped = [], set(), []
    for item in items:
        key = (item.path, item.originalname, _variant_of(item))
        if item.get_closest_marker("gpu_check") is None or key in seen:
            dropped.append(item)
            continue
        seen.add(key)
        kept.append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
