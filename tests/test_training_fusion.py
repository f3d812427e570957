"""Training across conv runs (issue 15): a conv -> BatchNorm -> ReLU run directly followed by
another conv run hands it its conv output and batch statistics, and the next conv applies the
BatchNorm and ReLU to its input tiles as it loads them (``fastarch::conv2d_chain``): the
normalised tensor is never written, forward or backward, and BatchNorm's backward is no pass
of its own (the consumer's dgrad epilogue and the producer's dgrad/wgrad prologues fold it; a
max pool's gather folds it likewise). Checked against torch.nn in float64 over training steps
(outputs, every gradient, running statistics), bitwise across runs, by the kernels a forward
and a backward launch, and under torch.compile."""
import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

from fastarch import fusion
from fastarch.testing import assert_close, cudnn_tf32, random_input
from training_steps import (assert_compiles_to_one_graph, assert_grad_close,
                            assert_trains_as_reference, train_step)
from variants import alternating

def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1,
                 bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Case(NamedTuple):
    modules: Callable[[], list[nn.Module]]
    output_shape: tuple[int, ...]  # of a (2, 3, 8, 8) input


# Each case hands every normalisation on to the next conv run or pool. An 8-channel input is a
# first-layer conv (C < 16: its padded copy applies the prologue); 16 channels take the
# channel loop (its tiles apply it).
CASES = {
    # -> BN -> ReLU -> max pool after the consumer; both convs with a bias
    "bias-copy-pool": Case(lambda: [*conv_bn_relu(3, 8), *conv_bn_relu(8, 16),
                                    nn.MaxPool2d(2)], (2, 16, 4, 4)),
    # no conv bias, the consumer strided
    "nobias-stride2": Case(lambda: [*conv_bn_relu(3, 16, bias=False),
                                    *conv_bn_relu(16, 16, stride=2, bias=False),
                                    nn.MaxPool2d(2)], (2, 16, 2, 2)),
    # three runs in a chain (two hand-offs), unpadded and 1x1 consumers, an avg pool last
    "chain-unpadded": Case(lambda: [*conv_bn_relu(3, 16, padding=0),
                                    *conv_bn_relu(16, 16, padding=0, bias=False),
                                    *conv_bn_relu(16, 8, kernel=1, padding=0),
                                    nn.AvgPool2d(2)], (2, 8, 2, 2)),
    # the consumer is a conv -> ReLU run (bias + ReLU epilogue), dilated, the sequence's end
    "into-conv-relu": Case(lambda: [*conv_bn_relu(3, 16),
                                    nn.Conv2d(16, 8, 3, padding=2, dilation=2), nn.ReLU()],
                           (2, 8, 8, 8)),
}

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


def _models(case: str, dtype: torch.dtype, device: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(fused in ``dtype``, the torch.nn reference in float64), with the same parameters. The
    reference rounds each conv output to ``dtype``, as the fused model stores it: else a
    16-bit rounding near 0 flips a ReLU's mask, which no tolerance covers."""
    model = nn.Sequential(*CASES[case].modules()).to(device=device, dtype=dtype)
    with torch.no_grad():  # BatchNorm away from its identity initialisation
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).double()
    for module in reference:
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _, inputs, y: y.to(dtype).double())
    return fusion.fuse(model), reference


@pytest.mark.parametrize("case, layout, dtype_name",
                         alternating(CASES, ["nchw", "nhwc"], list(DTYPES)))
def test_conv_batch_norm_relu_into_conv_trains_as_torch(case, layout, dtype_name, device,
                                                        kernels_run):
    dtype = DTYPES[dtype_name]
    fused, reference = _models(case, dtype, device)
    x = random_input((2, 3, 8, 8), dtype, device, channels_last=layout == "nhwc")
    tolerance_dtype = dtype_name if dtype_name == "tf32" else dtype
    with cudnn_tf32(dtype_name == "tf32"):
        assert_trains_as_reference(fused, reference, x, CASES[case].output_shape,
                                   tolerance_dtype, 144)
    assert "batch_norm_apply_kernel" not in kernels_run  # no normalised tensor written


@pytest.mark.parametrize("frozen", [nn.BatchNorm2d, nn.Conv2d], ids=["bn-affine", "conv"])
def test_frozen_parameters_train_as_torch(frozen, device):
    """Fine-tuning: the BatchNorms' affine parameters, or the convs' weights and biases, take
    no gradient (the backward folds skip them); the rest trains as torch."""
    fused, reference = _models("bias-copy-pool", torch.float32, device)
    for model in (fused, reference):
        for module in model.modules():
            if isinstance(module, frozen):
                module.requires_grad_(False)
    x = random_input((2, 3, 8, 8), torch.float32, device, channels_last=True)
    assert_trains_as_reference(fused, reference, x, CASES["bias-copy-pool"].output_shape,
                               torch.float32, 144)


def test_training_steps_are_bitwise_reproducible(device):
    first, _ = _models("chain-unpadded", torch.bfloat16, device)
    second = copy.deepcopy(first)
    x = random_input((2, 3, 8, 8), torch.bfloat16, device, channels_last=True)
    dy = random_input((2, 8, 2, 2), torch.bfloat16, device)
    outcomes = [train_step(model, x, dy) for model in (first, second)]
    for a, b in zip(*(torch.utils._pytree.tree_leaves(o) for o in outcomes), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def vgg_like(end_with_pool: bool) -> nn.Sequential:
    """VGG-BN's blocks, shrunk: two conv runs, a max pool, two more runs (then a pool)."""
    return nn.Sequential(*conv_bn_relu(3, 8), *conv_bn_relu(8, 16), nn.MaxPool2d(2),
                         *conv_bn_relu(16, 16), *conv_bn_relu(16, 16),
                         *([nn.MaxPool2d(2)] if end_with_pool else []))


# Ending in a pool, every normalised tensor is read by the next conv or pool as it loads it;
# ending in a conv run (nothing follows to take it), the last one is written.
@pytest.mark.parametrize("end_with_pool, written", [(True, 0), (False, 1)],
                         ids=["pool-last", "conv-run-last"])
def test_training_forward_writes_no_normalised_tensor(end_with_pool, written, device,
                                                      kernels_run):
    model = fusion.fuse(vgg_like(end_with_pool).to(device))
    x = random_input((2, 3, 8, 8), torch.float32, device, channels_last=True)
    model(x)
    assert kernels_run.count("batch_norm_apply_kernel") == written
    assert kernels_run.count("relu_forward_kernel") == 0
    assert kernels_run.count("conv2d_forward_kernel") == 4
    assert kernels_run.count("batch_norm_finalize_kernel") == 4


def test_training_backward_runs_no_batch_norm_pass(device, kernels_run):
    """VGG-like: every BatchNorm's backward folds into the dgrad epilogue of the conv that
    read its output, or into the max pool's gather, and the prologues of the convs that
    wrote its input: no BatchNorm, ReLU or elementwise pass of its own."""
    model = fusion.fuse(vgg_like(end_with_pool=True).to(device))
    x = random_input((2, 3, 8, 8), torch.float32, device, channels_last=True,
                     requires_grad=True)
    y = model(x)
    del kernels_run[:]
    y.backward(random_input(y.shape, torch.float32, device))
    assert not {"batch_norm_backward_partials_kernel", "batch_norm_backward_reduce_kernel",
                "batch_norm_backward_input_kernel", "relu_backward_kernel",
                "batch_norm_apply_kernel"} & set(kernels_run)
    assert kernels_run.count("max_pool2d_backward_kernel") == 2
    assert kernels_run.count("conv2d_dgrad_kernel") == 4  # the first conv's x too


# BatchNorms that F.batch_norm refuses in training: one value per channel (a batch of one
# 1x1 image), and eps 0; handed to a conv (a chain link) or a max pool (the folded pool).
REFUSED = {"one-value": (1, 1e-5), "eps0": (2, 0.0)}
CONSUMERS = {"conv": lambda: [nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU()],
             "max-pool": lambda: [nn.MaxPool2d(1)]}


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("refused", REFUSED)
def test_a_link_raises_torchs_error_before_writing(refused, consumer, device):
    """torch's error, type and message, before the link writes anything: the state after it
    is torch's (the batch counted, the running statistics untouched)."""
    batch, eps = REFUSED[refused]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 4), nn.BatchNorm2d(16, eps=eps), nn.ReLU(),
                          *CONSUMERS[consumer]()).to(device)
    fused = fusion.fuse(copy.deepcopy(model))
    x = random_input((batch, 3, 4, 4), torch.float32, device)
    outcomes = []
    for net in (model, fused):
        with pytest.raises(ValueError) as raised:
            net(x)
        outcomes.append((str(raised.value), net.state_dict()))
    (message, state), (fused_message, fused_state) = outcomes
    assert fused_message == message
    for name, value in state.items():
        assert torch.equal(fused_state[name], value), name


# The Hopper kernels (FASTARCH_CONV_ALGO=tma) take the folds too: 16-channel convs, stride 1
# (forward and wgrad on TMA) and stride 2 (dgrad by stride phase on TMA).
TMA_CASES = {
    "stride1": Case(lambda: [*conv_bn_relu(16, 16), *conv_bn_relu(16, 32), *conv_bn_relu(32, 16),
                             nn.MaxPool2d(2)], (2, 16, 4, 4)),
    "stride2": Case(lambda: [*conv_bn_relu(16, 16), *conv_bn_relu(16, 16, stride=2),
                             nn.MaxPool2d(2)], (2, 16, 2, 2)),
}


@pytest.mark.parametrize("case, dtype_name", [("stride1", "bf16"), ("stride2", "tf32")])
def test_folds_run_on_the_tma_kernels(case, dtype_name, device, monkeypatch, kernels_run):
    monkeypatch.setenv("FASTARCH_CONV_ALGO", "tma")
    monkeypatch.setitem(CASES, case, TMA_CASES[case])
    dtype = DTYPES[dtype_name]
    fused, reference = _models(case, dtype, device)
    x = random_input((2, 16, 8, 8), dtype, device, channels_last=True)
    dy = random_input(TMA_CASES[case].output_shape, dtype, device)
    tolerance_dtype = dtype_name if dtype_name == "tf32" else dtype
    with cudnn_tf32(dtype_name == "tf32"):
        y, dx, grads = train_step(fused, x, dy)
        y_ref, dx_ref, grads_ref = train_step(reference, x.double(), dy.double())
    assert_close(y, y_ref, tolerance_dtype, 288)
    assert_grad_close(dx, dx_ref, tolerance_dtype, "grad input")
    names = [name for name, _ in fused.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_grad_close(g, g_ref, tolerance_dtype, f"{name}.grad")
    assert "conv2d_dgrad_kernel" not in kernels_run  # every dgrad on TMA, folds included
    assert "batch_norm_backward_input_kernel" not in kernels_run
    if case == "stride1":
        assert "conv2d_wgrad_tma_kernel" in kernels_run


def test_eval_keeps_the_folded_single_kernel(device, kernels_run):
    model = fusion.fuse(vgg_like(end_with_pool=True).to(device)).eval()
    with torch.no_grad():
        model(random_input((2, 3, 8, 8), torch.float32, device))
    assert kernels_run.count("conv2d_forward_kernel") == 4
    assert not {"batch_norm_apply_kernel", "batch_norm_finalize_kernel",
                "relu_forward_kernel"} & set(kernels_run)


def test_compiles_to_one_graph_equal_to_eager(device):
    eager, _ = _models("bias-copy-pool", torch.float32, device)
    x = random_input((2, 3, 8, 8), torch.float32, device)
    dy = random_input((2, 16, 4, 4), torch.float32, device)
    assert_compiles_to_one_graph(eager, x, dy, "fastarch.conv2d_chain.default")