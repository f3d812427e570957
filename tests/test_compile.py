"""torch.compile: fastarch models, fused runs and the functional API trace into one graph
(``fullgraph=True``: a graph break raises) in which our kernels are ``torch.ops.fastarch``
operators, and the compiled code computes what eager fastarch computes: outputs, gradients,
running statistics.

This runs on the CPU too: Inductor's CPU backend compiles the glue around our operators, and
each operator runs its Triton kernel through the interpreter, as in eager mode."""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch._inductor.cpp_builder
import torch._inductor.exc

from fastarch import functional, fusion, models
from fastarch.testing import assert_close, random_input
from tiny_net import CLASSES, INPUT_SHAPE, TinyNet, randomize_batch_norm

# The ops each model's training graph must contain: proof the kernels are in the graph.
TRAINING_OPS = {"conv2d", "batch_norm_finalize", "relu", "linear", "adaptive_avg_pool2d"}


class GraphRecorder:
    """A torch.compile backend that keeps every Dynamo graph, then hands it to ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return self.backend(graph, example_inputs)

    def fastarch_ops(self) -> set[str]:
        return _fastarch_ops(node for graph in self.graphs for node in graph.graph.nodes)


def _fastarch_ops(nodes) -> set[str]:
    """The fastarch operators called in a graph, by name (``fastarch.conv2d.default`` ->
    ``conv2d``)."""
    return {str(node.target).split(".")[1] for node in nodes
            if node.op == "call_function" and str(node.target).startswith("fastarch.")}


def _inductor_can_compile(device: str) -> bool:
    """Inductor's CPU backend builds C++: it needs a compiler (CUDA code is Triton)."""
    if torch.device(device).type != "cpu":
        return True
    try:
        torch._inductor.cpp_builder.get_cpp_compiler()
    except torch._inductor.exc.InvalidCxxCompiler:
        return False
    return True


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: no cached graphs or recompile counts carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_step(model, x, dy, seed, run=None):
    """One forward (through ``run``, the compiled model, if given) and backward from a fixed
    dropout seed; returns output, dx, grads and buffers, and clears the grads."""
    torch.manual_seed(seed)
    x = x.detach().requires_grad_(True)
    y = (model if run is None else run)(x)
    y.backward(dy)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return y.detach(), x.grad, grads, buffers


def _assert_same_step(actual, expected, reduction_length):
    (y, dx, grads, buffers), (y_ref, dx_ref, grads_ref, buffers_ref) = actual, expected
    assert_close(y, y_ref.double(), torch.float32, reduction_length, name="output")
    assert_close(dx, dx_ref.double(), torch.float32, reduction_length, name="input grad")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name].double(), torch.float32, reduction_length,
                     name=f"grad {name}")
    for name, ref in buffers_ref.items():
        if ref.dtype.is_floating_point:
            assert_close(buffers[name], ref.double(), torch.float32, reduction_length, name=name)
        else:
            assert torch.equal(buffers[name], ref), name


# Inductor compiles one training and one inference graph; the other two stop after
# AOTAutograd (aot_eager), which sees the same Dynamo graph, at a fraction of the CI time.
# One test per backend: a process's first compile with a backend costs seconds of warm-up,
# paid once by the process that runs both of its graphs.
@pytest.mark.parametrize("backend, runs", [
    ("inductor", [(True, False), (False, True)]),
    ("aot_eager", [(True, True), (False, False)]),
], ids=["train-modules-eval-fused-inductor", "train-fused-eval-modules"])
@pytest.mark.gpu_check
@pytest.mark.slow
def test_model_compiles_to_one_graph_equal_to_eager(device, backend, runs):
    """Each (training, fused) run: a fresh model, compiled, against eager fastarch."""
    if backend == "inductor" and not _inductor_can_compile(device):
        pytest.skip("Inductor's CPU backend needs a C++ compiler; none was found")
    for training, fused in runs:
        torch._dynamo.reset()
        _assert_compiles_to_one_graph_equal_to_eager(device, training, fused, backend)


def _assert_compiles_to_one_graph_equal_to_eager(device, training, fused, backend):
    eager = randomize_batch_norm(TinyNet(dropout=0.5)).to(device).train(training)
    if fused:
        fusion.fuse(eager)
    recorder = GraphRecorder(backend)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=recorder, fullgraph=True)
    x = random_input(INPUT_SHAPE, torch.float32, device)
    dy = random_input((INPUT_SHAPE[0], CLASSES), torch.float32, device)
    # Dropout masks come from torch's generator in both (Inductor would draw its own).
    with torch._inductor.config.patch(fallback_random=True):
        # A second training step reuses the graph with the updated running statistics.
        for step in range(2 if training else 1):
            _assert_same_step(_train_step(twin, x, dy, step, compiled),
                              _train_step(eager, x, dy, step), reduction_length=16 * 9)
        assert len(recorder.graphs) == 1
        if not training:  # inference without autograd: fused runs fold BN into the conv
            with torch.no_grad():
                assert_close(compiled(x), eager(x).double(), torch.float32, 16 * 9,
                             name="no-grad output")
            assert len(recorder.graphs) == 2
    expected = TRAINING_OPS if training else TRAINING_OPS - {"batch_norm_finalize"}
    if fused:  # the ReLUs run inside the fused conv and linear kernels
        expected = expected - {"relu"}
    assert expected <= recorder.fastarch_ops()


def _functional_tour(x, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                     linear_weight, scale, shift):
    """Every functional entry point the modules do not reach, in one function."""
    # padding="same" with an even kernel pads more at the end; the epilogue keeps the stats.
    y, partials = functional.conv2d_fused(x, conv_weight, None, padding="same", stats=True)
    y = functional.batch_norm_relu(y, running_mean, running_var, bn_weight, bn_bias,
                                   training=True, partials=partials)
    pooled, indices = functional.max_pool2d(y, 3, 2, 1, return_indices=True)
    averaged = functional.batch_norm_avg_pool2d(y, running_mean, running_var, bn_weight,
                                                bn_bias, training=True, kernel_size=2)
    maxed = functional.batch_norm_max_pool2d(y, running_mean, running_var, bn_weight, bn_bias,
                                             training=False, kernel_size=2)
    folded, _ = functional.conv2d_fused(x, conv_weight, None, padding=1, scale=scale,
                                        shift=shift, relu=True)
    flat = torch.cat([pooled.flatten(1), averaged.flatten(1), maxed.flatten(1),
                      folded.flatten(1)], 1)
    hidden = functional.linear_relu_dropout(flat, linear_weight, None, relu=False, p=0.25)
    hidden = functional.relu(hidden.t(), inplace=True).t()  # a non-dense in-place ReLU
    hidden = functional.dropout(hidden, 0.5, inplace=True)
    return hidden, indices


def test_functional_api_compiles_to_one_graph_equal_to_eager(device):
    x = random_input((2, 3, 6, 6), torch.float32, device, requires_grad=True)
    params = [random_input(shape, torch.float32, device, requires_grad=True)
              for shape in ((4, 3, 2, 2), (4,), (4,))]
    stats = [torch.zeros(4, device=device), torch.ones(4, device=device)]
    linear_weight = random_input((5, 4 * (9 + 9 + 9 + 49)), torch.float32, device,
                                 requires_grad=True)
    constants = [random_input((4,), torch.float32, device) for _ in range(2)]
    recorder = GraphRecorder("aot_eager")
    compiled = torch.compile(_functional_tour, backend=recorder, fullgraph=True)

    def run(fn, seed):
        torch.manual_seed(seed)
        leaves = [x, *params, linear_weight]
        running = [s.clone() for s in stats]
        out, indices = fn(x, *params, *running, linear_weight, *constants)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        return out, indices, grads, running

    actual, expected = run(compiled, 3), run(_functional_tour, 3)
    assert_close(actual[0], expected[0].double(), torch.float32, 300, name="output")
    assert torch.equal(actual[1], expected[1]), "max_pool2d indices"
    for index, (grad, ref) in enumerate(zip(actual[2], expected[2])):
        assert_close(grad, ref.double(), torch.float32, 300, name=f"grad {index}")
    for name, stat, ref in zip(("running_mean", "running_var"), actual[3], expected[3]):
        assert_close(stat, ref.double(), torch.float32, 36, name=name)
    assert len(recorder.graphs) == 1
    assert {"conv2d", "batch_norm_finalize", "batch_norm_avg_pool2d", "batch_norm_max_pool2d",
            "max_pool2d", "linear", "dropout", "relu"} <= recorder.fastarch_ops()


@pytest.mark.parametrize("name, input_shape, ops", [
    ("lenet5", (2, 1, 32, 32), {"conv2d", "avg_pool2d", "linear"}),
    # AlexNet's leading classifier Dropout runs by itself; every ReLU is fused.
    ("alexnet", (2, 3, 64, 64), {"conv2d", "max_pool2d", "adaptive_avg_pool2d", "linear",
                                 "dropout"}),
    # Every VGG-BN conv is a chain link (its finalize inside), every pool a folded one.
    ("vgg11_bn", (2, 3, 64, 64), {"conv2d_chain", "batch_norm_max_pool2d",
                                  "adaptive_avg_pool2d", "linear"}),
])
def test_models_trace_without_graph_breaks(device, name, input_shape, ops):
    """The full-size models (fused by default), exported in strict mode: Dynamo traces the whole training
    forward on fake tensors (a graph break is an error), so no kernel runs."""
    model = getattr(models, name)(num_classes=10).to(device)
    x = random_input(input_shape, torch.float32, device)
    program = torch.export.export(model, (x,), strict=True)
    assert ops <= _fastarch_ops(program.graph.nodes)
