"""Training steps of a fused model against its torch.nn twin in float64, shared by the
training-fusion tests: each step compares the output, the input gradient and every parameter
gradient from the same parameters, then the state dicts (running statistics included)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fastarch.testing import assert_close, random_input

LEARNING_RATE = 0.005


def train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One forward and backward: (output, input grad, the trained parameters' grads), then an
    SGD step."""
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in trained]
    with torch.no_grad():
        for p in trained:
            p.sub_(LEARNING_RATE * p.grad)
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def assert_grad_close(grad: torch.Tensor, reference: torch.Tensor, dtype, name: str) -> None:
    """A gradient against float64, in units of the reference's largest element for 16-bit
    dtypes (a power of two: exact): their ReLU masks can differ from float64's where the
    normalised value rounds near 0 (the statistics come from the fp32 accumulator, the
    reference's from the rounded output), and such an element's gradient is the size of
    any other's, not of a rounding error."""
    unit = 1.0
    if grad.dtype != torch.float32:
        unit = 2.0 ** math.ceil(math.log2(max(reference.abs().max().item(), 1.0)))
    assert_close(grad / unit, reference / unit, dtype, 288, name=name)


def take_parameters(reference: nn.Module, fused: nn.Module) -> None:
    """The reference takes the fused model's parameters: each step compares one step's
    kernels from the same start (a 16-bit SGD update rounds away from float64's)."""
    with torch.no_grad():
        for p_ref, p in zip(reference.parameters(), fused.parameters(), strict=True):
            p_ref.copy_(p)


def assert_trains_as_reference(fused: nn.Module, reference: nn.Module, x: torch.Tensor,
                               output_shape: tuple[int, ...], dtype, output_terms: int,
                               steps: int = 2) -> None:
    """``steps`` training steps of ``fused`` and its float64 ``reference`` on ``x`` (fresh
    output gradients each step): outputs (``output_terms``: the reduction length their
    tolerance scales with), every gradient, then the state dicts. ``dtype``: the tolerance's
    dtype or mode ("tf32")."""
    for step in range(steps):
        dy = random_input(output_shape, x.dtype, x.device)
        y, dx, grads = train_step(fused, x, dy)
        y_ref, dx_ref, grads_ref = train_step(reference, x.double(), dy.double())
        assert_close(y, y_ref, dtype, output_terms, name=f"step {step} output")
        assert_grad_close(dx, dx_ref, dtype, f"step {step} grad input")
        names = [name for name, p in fused.named_parameters() if p.requires_grad]
        for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
            assert_grad_close(g, g_ref, dtype, f"step {step} {name}.grad")
        take_parameters(reference, fused)
    for (name, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items(),
                                 strict=True):
        if a.dtype.is_floating_point:
            assert_close(a, b, dtype, 288, name=name)
        else:
            assert torch.equal(a, b), name  # num_batches_tracked counted once a step


def assert_compiles_to_one_graph(model: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                                 operator: str) -> None:
    """torch.compile(fullgraph=True) of a copy of ``model`` takes one graph that calls
    ``operator`` and trains one step bitwise equal to ``model`` in eager."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    compiled = torch.compile(copy.deepcopy(model), backend=recording_backend, fullgraph=True)
    try:
        ours, theirs = train_step(compiled, x, dy), train_step(model, x, dy)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert operator in ops
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs),
                    strict=True):
        assert torch.equal(a, b)
