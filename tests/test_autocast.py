"""Autocast: under ``torch.autocast`` fastarch layers choose the dtypes torch.nn's layers choose
on the same inputs (convolution and linear in the low-precision dtype, BatchNorm statistics,
running statistics and parameter gradients in fp32, every layer's output dtype as torch's),
and compute what torch computes to the low-precision tolerance.

On the CPU torch's CPU autocast policy applies (our kernels run in the interpreter); with a
GPU the same tests run ``torch.autocast("cuda")`` against cuDNN / cuBLAS."""
import pytest
import torch

from fastarch import fusion
from fastarch.testing import assert_close, random_input, tolerance
from tiny_net import INPUT_SHAPE, TinyNet, randomize_batch_norm, torch_twin

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _layer_dtypes(model: torch.nn.Module) -> tuple[list, list]:
    """Forward hooks recording (layer, input dtype, output dtype) for every leaf layer; the
    second list holds the hook handles."""
    seen, handles = [], []
    for name, module in model.named_modules():
        if not any(module.children()):
            def record(module, args, output, name=name):
                seen.append((name, args[0].dtype, output.dtype))
            handles.append(module.register_forward_hook(record))
    return seen, handles


def _run(model, x, device_type, dtype):
    x = x.detach().requires_grad_(True)
    with torch.autocast(device_type, dtype=dtype):
        y = model(x)
    y.float().square().sum().backward()
    return y, x.grad


@pytest.mark.gpu_check
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_training_under_autocast_matches_torch_nn(device, dtype, fused):
    model = randomize_batch_norm(TinyNet()).to(device)
    if fused:
        fusion.fuse(model)
    reference = torch_twin(model)
    x = random_input(INPUT_SHAPE, torch.float32, device)
    device_type = torch.device(device).type
    layers, handles = _layer_dtypes(model)
    reference_layers, _ = _layer_dtypes(reference)
    y, dx = _run(model, x, device_type, dtype)
    y_ref, dx_ref = _run(reference, x, device_type, dtype)
    for handle in handles:
        handle.remove()

    # A fused run hides its modules from their hooks; the layers that did run match.
    ran = {name for name, _, _ in layers}
    assert layers == [layer for layer in reference_layers if layer[0] in ran]
    assert fused or len(layers) == len(reference_layers)
    assert y.dtype == y_ref.dtype == dtype
    assert_close(y, y_ref.double(), dtype, 16 * 9, name="output")
    assert dx.dtype == dx_ref.dtype == torch.float32  # the input's dtype, computed in low precision
    rtol, atol = tolerance(dtype, 16 * 9)
    torch.testing.assert_close(dx, dx_ref, rtol=rtol, atol=atol)
    expected_state = reference.state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == expected_state[name].dtype, name  # running stats stay fp32
        if value.dtype.is_floating_point:  # statistics of low-precision activations
            rtol, atol = tolerance(dtype)
            torch.testing.assert_close(value, expected_state[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    grads, expected_grads = [], []
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert param.grad.dtype == ref.grad.dtype == torch.float32, name
        grads.append(param.grad.flatten())
        expected_grads.append(ref.grad.flatten())
    # Low-precision backward passes: compare all gradients as one vector, by its norm (the
    # conv biases before BatchNorm have gradients that are rounding noise around zero), to
    # ten low-precision epsilons (the Triton 3.6 interpreter rounds fp32 to bf16 by
    # truncation, which alone doubles our bf16 error on the CPU).
    error = (torch.cat(grads) - torch.cat(expected_grads)).norm()
    bound = 10 * torch.finfo(dtype).eps * torch.cat(expected_grads).norm()
    assert error <= bound, f"gradient error {error}, allowed {bound}"


@pytest.mark.gpu_check
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
def test_inference_under_autocast_matches_torch_nn(device, dtype):
    """Eval mode without autograd: the fused runs fold BN into the conv epilogue (fp32
    scale and shift applied to the low-precision conv)."""
    model = fusion.fuse(randomize_batch_norm(TinyNet()).to(device)).eval()
    reference = torch_twin(model)
    x = random_input(INPUT_SHAPE, torch.float32, device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype):
        y, y_ref = model(x), reference(x)
    assert y.dtype == y_ref.dtype == dtype
    assert_close(y, y_ref.double(), dtype, 16 * 9, name="output")
