"""Distributed training: a fastarch model (fused, its BatchNorms converted to
``fastarch.nn.SyncBatchNorm``) trains under DistributedDataParallel in two processes on gloo,
each holding half the batch, and computes what one process computes on the whole batch:
outputs, input and parameter gradients, running statistics, over two SGD steps; with an
uneven split too (SyncBatchNorm merges partials of different counts).

The processes, and the one-process reference (computed in the first of them afterwards), run
our kernels where the tests run them: compiled on the GPU (both processes share it, over gloo),
or without one on the CPU through the Triton interpreter (TRITON_INTERPRET=1 is in their
environment before they import triton; a GPU image's numpy may be too new for the interpreter,
so it is never forced there)."""
import datetime
import inspect
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastarch import functional, fusion, nn
from fastarch.testing import assert_close
from tiny_net import CLASSES, TinyNet, randomize_batch_norm

WORLD_SIZE = 2
GLOBAL_BATCH = 4
STEPS = 2
UNEVEN_SPLIT = (3, 1)
TIMEOUT_S = 120
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fusion.fuse(randomize_batch_norm(TinyNet())).to(DEVICE)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((GLOBAL_BATCH, 3, 8, 8), generator=generator)
    target = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator)
    return x.to(DEVICE), target.to(DEVICE)


def _train(model, optimizer, x, target) -> dict:
    """STEPS SGD steps on (x, target); what each step saw and the final state."""
    record = {"outputs": [], "input_grads": [], "grads": []}
    for _ in range(STEPS):
        optimizer.zero_grad()
        x = x.detach().requires_grad_(True)
        output = model(x)
        torch.nn.functional.cross_entropy(output, target).backward()
        record["outputs"].append(output.detach())
        record["input_grads"].append(x.grad)
        record["grads"].append({name: p.grad.clone() for name, p in _named_parameters(model)})
        optimizer.step()
    record["state"] = {name: t.clone() for name, t in _unwrapped(model).state_dict().items()}
    return record


class InterpreterDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel without its refusal of SyncBatchNorm layers on CPU modules
    (torch's SyncBatchNorm has no CPU kernels; ours runs there under the interpreter)."""

    def _passing_sync_batchnorm_handle(self, module: torch.nn.Module) -> None:
        pass


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _named_parameters(model: torch.nn.Module):
    return _unwrapped(model).named_parameters()


def _uneven_forward(model, x: torch.Tensor) -> dict:
    """A training-mode forward without autograd on this process's share of an uneven split."""
    with torch.no_grad():
        output = model(x)
    return {"output": output,
            "state": {name: t.clone() for name, t in _unwrapped(model).state_dict().items()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
        ddp = InterpreterDDP(model)
        x, target = _global_batch()
        share = GLOBAL_BATCH // WORLD_SIZE
        local = slice(rank * share, (rank + 1) * share)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        record = _train(ddp, optimizer, x[local], target[local])
        start = sum(UNEVEN_SPLIT[:rank])
        record["uneven"] = _uneven_forward(ddp, x[start:start + UNEVEN_SPLIT[rank]])
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    if rank == 0:  # the reference, here so that it runs as the workers do on any machine
        torch.save(_one_process(), os.path.join(out_dir, "reference.pt"))


def _one_process() -> dict:
    """The same training and uneven forward, in one process on the global batch."""
    model = _model()
    x, target = _global_batch()
    record = _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), x,
                    target)
    record["uneven"] = _uneven_forward(model, x)
    return record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: str) -> None:
    """Run ``_worker`` in WORLD_SIZE fresh processes (under the interpreter without a GPU);
    fail (never hang) if one fails or they take longer than TIMEOUT_S."""
    saved = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by the children, read at their import
    try:
        context = mp.start_processes(_worker, args=(_free_port(), out_dir),
                                     nprocs=WORLD_SIZE, join=False, start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {TIMEOUT_S} s")


def _assert_states_close(state: dict, reference: dict, reduction_length: int) -> None:
    for name, expected in reference.items():
        if expected.dtype.is_floating_point:
            assert_close(state[name], expected.double(), torch.float32, reduction_length,
                         name=name)
        else:
            assert torch.equal(state[name], expected), name


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.slow
@pytest.mark.gpu_check
def test_ddp_with_sync_batch_norm_equals_one_process_on_the_global_batch(tmp_path):
    _spawn(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in range(WORLD_SIZE)]
    expected = torch.load(tmp_path / "reference.pt", map_location="cpu")
    reduction = 16 * 9 * GLOBAL_BATCH
    for step in range(STEPS):
        output = torch.cat([rank["outputs"][step] for rank in ranks])
        assert_close(output, expected["outputs"][step].double(), torch.float32, reduction,
                     name=f"step {step} output")
        # Each process's loss is the mean over its half. Its input gradient is that of the sum
        # of all the processes' losses (SyncBatchNorm couples them): WORLD_SIZE times the
        # global mean's. DDP averages the parameter gradients: the global mean's.
        input_grad = torch.cat([rank["input_grads"][step] for rank in ranks])
        assert_close(input_grad, expected["input_grads"][step].double() * WORLD_SIZE,
                     torch.float32, reduction, name=f"step {step} input grad")
        for rank in ranks:
            for name, grad in rank["grads"][step].items():
                assert_close(grad, expected["grads"][step][name].double(), torch.float32,
                             reduction, name=f"step {step} grad {name}")
    for rank in ranks:
        _assert_states_close(rank["state"], expected["state"], reduction)

    uneven = expected["uneven"]
    assert_close(torch.cat([rank["uneven"]["output"] for rank in ranks]),
                 uneven["output"].double(), torch.float32, reduction, name="uneven output")
    for rank in ranks:
        _assert_states_close(rank["uneven"]["state"], uneven["state"], reduction)


def test_sync_batch_norm_takes_torchs_arguments():
    assert inspect.signature(nn.SyncBatchNorm) == inspect.signature(torch.nn.SyncBatchNorm)
    layer = nn.SyncBatchNorm(6, eps=1e-3, momentum=0.2, affine=True)
    reference = torch.nn.SyncBatchNorm(6, eps=1e-3, momentum=0.2, affine=True)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    assert repr(layer) == repr(reference)


def test_convert_sync_batchnorm_replaces_every_batch_norm_and_shares_its_tensors():
    model = torch.nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, affine=False),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 6 * 6)))
    model[1].eval()
    originals = [model[1], model[2], model[3][1]]
    keys = list(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    replaced = [model[1], model[2], model[3][1]]
    for old, new in zip(originals, replaced):
        assert type(new) is nn.SyncBatchNorm
        assert (new.num_features, new.eps, new.momentum, new.affine,
                new.track_running_stats) == (old.num_features, old.eps, old.momentum,
                                             old.affine, old.track_running_stats)
        assert new.weight is old.weight and new.bias is old.bias
        assert new.running_mean is old.running_mean and new.running_var is old.running_var
        assert new.num_batches_tracked is old.num_batches_tracked
        assert new.training == old.training
    assert list(model.state_dict()) == keys
    lone = torch.nn.BatchNorm2d(4)
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(lone)) is nn.SyncBatchNorm


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sync_batch_norm_without_a_process_group_is_batch_norm(device, training):
    """One process (no process group initialised): what fastarch's BatchNorm2d computes."""
    assert not dist.is_initialized()
    layer = randomize_batch_norm(nn.SyncBatchNorm(5)).to(device).train(training)
    reference = randomize_batch_norm(nn.BatchNorm2d(5)).to(device).train(training)
    x = torch.randn((3, 5, 4, 4), device=device)
    assert_close(layer(x), reference(x).double(), torch.float32, 48, name="output")
    _assert_states_close(layer.state_dict(), reference.state_dict(), 48)


@pytest.mark.torch_fallback
def test_sync_batch_norm_fallback_refuses_what_torchs_refuses():
    """float64 (or a CPU without the interpreter) falls back to torch's SyncBatchNorm
    function, which takes CUDA tensors only: on the CPU, torch's error type."""
    x = torch.randn((4, 3, 2, 2), dtype=torch.float64)
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        functional.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, dist.group.WORLD)
