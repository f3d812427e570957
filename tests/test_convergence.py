"""Convergence on real data: LeNet-5 on scikit-learn's handwritten digits (real 8x8 scans
scaled to 32x32, nothing downloaded), trained with fastarch and with torch.nn from the same
weights on the same batches. The first steps agree loss by loss (in CI, under the
interpreter); on a GPU the full run reaches the target test accuracy."""
import copy
import dataclasses

import pytest
import torch

from fastarch import digits, models
from model_cases import NotesLeNet5, assert_as_accurate_as_torch, ieee_fp32

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
