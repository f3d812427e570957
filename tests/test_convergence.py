"""Convergence on real data: LeNet-5 and ResNet-18 on scikit-learn's handwritten digits (real
8x8 scans scaled to 32x32, nothing downloaded; ResNet's stem sees the grey scan as three
equal channels), trained with fastarch and with torch.nn from the same weights on the same
batches. The first steps agree loss by loss (in CI, under the interpreter: ResNet-18 at a
sixteenth of its widths); on a GPU the full run reaches the target test accuracy (LeNet-5) or
torch.nn's own with the same recipe (ResNet-18 at its full widths)."""
import copy
import dataclasses

import pytest
import torch

from fastarch import digits, models
from model_cases import NotesLeNet5, assert_as_accurate_as_torch, ieee_fp32
from resnet_reference import torchvision_resnet

# The demo's interpreter recipe (AdamW, lr held then decayed) for four steps (the last one
# decayed), on batches of 8 to keep the interpreter's share of CI small.
FIRST_STEPS = dataclasses.replace(digits.INTERPRETER_RUN, steps=4, batch_size=8)


@pytest.fixture
def data() -> digits.Digits:
    """The digits, imported when a test needs them (scikit-learn's import takes seconds)."""
    pytest.importorskip("sklearn", reason="scikit-learn (a dependency of fastarch: the digits) "
                        "is not installed here, e.g. after benchmarks/gpu_check.sh's --no-deps "
                        "install")
    return digits.load_digits_32x32()


def _float64(data: digits.Digits) -> digits.Digits:
    return digits.Digits(*(t.double() if t.is_floating_point() else t for t in (
        data.train_images, data.train_labels, data.test_images, data.test_labels)))


@pytest.mark.slow
@pytest.mark.gpu_check
@pytest.mark.usefixtures("shipped_interpreter_tiles")  # the demo's tiles
def test_first_steps_match_torch_loss_by_loss(device, data):
    ours = models.lenet5()
    reference = NotesLeNet5()
    reference.load_state_dict(ours.state_dict())
    exact = copy.deepcopy(reference).double()
    initial = {key: t.clone() for key, t in ours.state_dict().items()}
    with ieee_fp32():
        our_losses = digits.train(ours.to(device), data.to(device), FIRST_STEPS, seed=0)
        torch_losses = digits.train(reference, data, FIRST_STEPS, seed=0)
    digits.train(exact, _float64(data), FIRST_STEPS, seed=0)  # the float64 truth

    assert len(our_losses) == FIRST_STEPS.steps
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(torch_losses),
                               rtol=1e-5, atol=0)
    for name, param in exact.named_parameters():
        assert not torch.equal(ours.get_parameter(name).detach().cpu(), initial[name]), \
            f"{name} did not train"
        assert_as_accurate_as_torch(ours.get_parameter(name).detach(),
                                    reference.get_parameter(name).detach(), param.detach(),
                                    torch.float32, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: the full run is 440 steps, hours under the interpreter")
@pytest.mark.gpu_check
def test_full_run_reaches_the_target_accuracy(data):
    data = data.to("cuda")
    model = models.lenet5().to("cuda")
    digits.train(model, data, digits.FULL_RUN, seed=0)
    accuracy = digits.accuracy(model, data.test_images, data.test_labels)
    assert accuracy >= digits.TARGET_ACCURACY, f"test accuracy {accuracy:.3f}"


# ResNet-18 under the interpreter: a sixteenth of torchvision's widths, two steps of 8 images.
RESNET_WIDTHS = (4, 8, 16, 32)
RESNET_FIRST_STEPS = dataclasses.replace(FIRST_STEPS, steps=2)
# Test accuracy ours may fall short of torch.nn's by, from the same weights and batches
# (the runs part ways by rounding): 1.5 %, about 5 of the 359 held-out images. torch.nn's
# full-width ResNet-18 reaches 99.2 % (seed 0) and 99.4 % (seed 1) with FULL_RUN (fp32, CPU).
RESNET_ACCURACY_MARGIN = 0.015


def _rgb(data: digits.Digits) -> digits.Digits:
    """The grey scans as three equal channels: ResNet's stem takes RGB."""
    return digits.Digits(*(t.expand(-1, 3, -1, -1).contiguous() if t.dim() == 4 else t
                           for t in (data.train_images, data.train_labels, data.test_images,
                                     data.test_labels)))


def _resnet18_pair(**kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """fastarch's ResNet-18 and the torch.nn reference holding its weights."""
    ours = models.resnet18(num_classes=10, **kwargs)
    reference = torchvision_resnet("resnet18", num_classes=10, **kwargs)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.slow
@pytest.mark.usefixtures("shipped_interpreter_tiles")
def test_resnet18_first_steps_match_torch_loss_by_loss(device, data):
    data = _rgb(data)
    ours, reference = _resnet18_pair(widths=RESNET_WIDTHS)
    exact = copy.deepcopy(reference).double()
    with ieee_fp32():
        our_losses = digits.train(ours.to(device), data.to(device), RESNET_FIRST_STEPS, seed=0)
        torch_losses = digits.train(reference, data, RESNET_FIRST_STEPS, seed=0)
    exact_losses = digits.train(exact, _float64(data), RESNET_FIRST_STEPS, seed=0)

    for step, (a, t, e) in enumerate(zip(our_losses, torch_losses, exact_losses)):
        assert_as_accurate_as_torch(torch.tensor(a), torch.tensor(t), torch.tensor(e),
                                    torch.float32, f"loss {step}")
    for name, param in exact.named_parameters():
        assert_as_accurate_as_torch(ours.get_parameter(name).detach(),
                                    reference.get_parameter(name).detach(), param.detach(),
                                    torch.float32, name)
    for name, buffer in exact.named_buffers():
        assert_as_accurate_as_torch(ours.get_buffer(name), reference.get_buffer(name), buffer,
                                    torch.float32, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: 440 steps of a full-width ResNet-18")
@pytest.mark.gpu_check
def test_resnet18_full_run_reaches_torchs_accuracy(data):
    data = _rgb(data).to("cuda")
    ours, reference = (model.to("cuda") for model in _resnet18_pair())
    digits.train(ours, data, digits.FULL_RUN, seed=0)
    digits.train(reference, data, digits.FULL_RUN, seed=0)
    accuracy = digits.accuracy(ours, data.test_images, data.test_labels)
    torchs = digits.accuracy(reference, data.test_images, data.test_labels)
    assert accuracy >= max(torchs - RESNET_ACCURACY_MARGIN, digits.TARGET_ACCURACY), \
        f"test accuracy {accuracy:.3f}, torch.nn's {torchs:.3f}"
