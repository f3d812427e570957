"""CUDA graphs: a fastarch model's inference forward and its whole training step (forward,
backward, optimizer step) are captured with ``torch.cuda.graph`` and replay to what eager
execution computes.

Capture needs launchers that never make the host wait for the device (no ``.item()``,
``.tolist()``, ``float(tensor)``, no branch on a tensor's value) and never size an allocation
from tensor data. The capture tests need a GPU; on every machine, ``HostSyncDetector`` runs a
forward and backward through every fastarch operator and fails on any such op, inside our
launchers included."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastarch import functional, fusion, models
from fastarch.testing import assert_close, random_input
from tiny_net import CLASSES, INPUT_SHAPE, TinyNet, randomize_batch_norm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device")

# Ops that read a tensor's value on the host (item, float(t), bool(t), tolist) or size
# their output from tensor data.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                 "aten::_unique", "aten::_unique2", "aten::unique_dim",
                 "aten::unique_consecutive", "aten::unique_dim_consecutive",
                 "aten::repeat_interleave", "aten::_assert_async"}


def _fastarch_op_names() -> set[str]:
    return {name for name in torch._library.custom_ops.OPDEFS if name.startswith("fastarch::")}


class HostSyncDetector(TorchDispatchMode):
    """Raises on every op in ``HOST_SYNC_OPS`` and on copies from the GPU to the host. A
    fastarch operator runs its Python implementation with the detector still active, so the
    ops inside our launchers are checked, not just the operator call."""

    def __init__(self) -> None:
        super().__init__()
        self.fastarch_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in HOST_SYNC_OPS or _copies_to_host(func, args, kwargs):
            raise AssertionError(f"{name} makes the host wait for the device")
        if name.startswith("fastarch::"):
            self.fastarch_ops.add(name)
            implementation = torch._library.custom_ops.OPDEFS[name]._init_fn
            with self:
                return implementation(*args, **kwargs)
        return func(*args, **kwargs)


def _copies_to_host(func, args, kwargs) -> bool:
    name = func._schema.name
    if name == "aten::_to_copy":
        device = kwargs.get("device")
        return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
    if name == "aten::copy_":
        return args[1].is_cuda and not args[0].is_cuda
    return False


def test_host_sync_detector_catches_a_value_read():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with HostSyncDetector():
            float(torch.ones(2).sum())


@pytest.mark.gpu_check
def test_every_launcher_runs_without_host_sync(device, process_group):
    """Training and inference, module by module and fused, plus the functional paths the
    model does not take (SyncBatchNorm on a one-process group): together they reach every
    fastarch operator."""
    detector = HostSyncDetector()
    x = random_input(INPUT_SHAPE, torch.float32, device)
    with detector:
        for fused in (False, True):
            model = randomize_batch_norm(TinyNet(dropout=0.5)).to(device)
            if fused:
                fusion.fuse(model)
            model(x.requires_grad_(True)).sum().backward()
            with torch.no_grad():
                model.eval()(x)
        resnet = models.resnet18(num_classes=CLASSES, widths=(8, 8, 16, 16)).to(device)
        resnet(x).sum().backward()  # a block's BN + add + ReLU pass
        with torch.no_grad():
            resnet.eval()(x)  # the residual in the conv epilogue
        _batch_norm_into_conv(x).sum().backward()
        _batch_norm_into_linear(x).sum().backward()
        functional.relu(x).sum().backward()
        functional.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5,
                                   process_group).sum().backward()
        with torch.no_grad():
            functional.dropout(x.clone(), 0.5, inplace=True)
    assert detector.fastarch_ops == _fastarch_op_names()


def _batch_norm_into_conv(x: torch.Tensor) -> torch.Tensor:
    """A training BatchNorm + ReLU applied in the next conv's prologue."""
    channels = x.shape[1]
    weight = random_input((4, channels, 3, 3), x.dtype, x.device, requires_grad=True)
    y, _ = functional.batch_norm_conv2d_fused(
        x, torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device),
        training=True, weight=weight, padding=1)
    return y


def _batch_norm_into_linear(x: torch.Tensor) -> torch.Tensor:
    """A training BatchNorm + ReLU applied in the next linear's prologue, flattened."""
    channels = x.shape[1]
    weight = random_input((4, x[0].numel()), x.dtype, x.device, requires_grad=True)
    return functional.batch_norm_linear_fused(
        x, torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device),
        training=True, weight=weight)


# ----------------------------------------------------------------------------- GPU capture

def _warm_up(step, iterations: int = 3) -> None:
    """Run ``step`` on a side stream first, as torch.cuda.graph requires (Triton compiles
    its kernels here, never during capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(iterations):
            step()
    torch.cuda.current_stream().wait_stream(stream)


def _model(fused: bool, training: bool) -> torch.nn.Module:
    model = randomize_batch_norm(TinyNet(dropout=0.0)).cuda().train(training)
    return fusion.fuse(model) if fused else model


@pytest.mark.gpu_check
@needs_cuda
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_inference_forward_replays_equal_to_eager(fused):
    model = _model(fused, training=False)
    static_x = random_input(INPUT_SHAPE, torch.float32, "cuda")
    with torch.no_grad():
        _warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(3):
            x = random_input(INPUT_SHAPE, torch.float32, "cuda")
            static_x.copy_(x)
            graph.replay()
            assert_close(static_y, model(x).double(), torch.float32, 16 * 9, name="replay")
        # Replays read the parameters and statistics where they live, as torch's layers do:
        # a fused run folds them into the conv epilogue inside the graph.
        for bn in (model.features[1], model.features[5]):
            bn.running_var.mul_(3.0)
            bn.weight.add_(0.5)
        graph.replay()
        assert_close(static_y, model(static_x).double(), torch.float32, 16 * 9,
                     name="replay after new statistics")


class _TrainingStep:
    """Forward, cross-entropy, backward and an SGD-with-momentum step on fixed buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.x = torch.empty(INPUT_SHAPE, device="cuda")
        self.target = torch.empty(INPUT_SHAPE[0], dtype=torch.long, device="cuda")

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def load(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self.x.copy_(x)
        self.target.copy_(target)


@pytest.mark.gpu_check
@needs_cuda
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_training_step_replays_equal_to_eager(fused):
    model = _model(fused, training=True)
    eager, captured = _TrainingStep(model), _TrainingStep(copy.deepcopy(model))
    batches = [(random_input(INPUT_SHAPE, torch.float32, "cuda"),
                torch.randint(0, CLASSES, (INPUT_SHAPE[0],), device="cuda")) for _ in range(4)]
    for step in (eager, captured):
        step.load(*batches[0])
    _warm_up(captured)
    with _SyncDebugErrors():
        for _ in range(3):  # the same warm-up, eagerly, with the host never waiting
            eager()
    graph = torch.cuda.CUDAGraph()
    captured.optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = captured()
    for batch in batches[1:]:
        eager.load(*batch)
        captured.load(*batch)
        graph.replay()
        assert_close(static_loss, eager().double(), torch.float32, CLASSES, name="loss")
    reference = dict(eager.model.state_dict())
    for name, value in captured.model.state_dict().items():
        if value.dtype.is_floating_point:
            assert_close(value, reference[name].double(), torch.float32, 16 * 9, name=name)
        else:
            assert torch.equal(value, reference[name]), name


class _SyncDebugErrors:
    """torch.cuda.set_sync_debug_mode("error") for a block: a synchronising CUDA call raises."""

    def __enter__(self) -> None:
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc_info) -> None:
        torch.cuda.set_sync_debug_mode(self.previous)
