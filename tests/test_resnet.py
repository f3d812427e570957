"""fastarch.models' ResNets and their fused residual blocks against torchvision's ResNet
written out in torch.nn (``resnet_reference``): state_dict keys, arguments, initialisation,
eval and training outputs, every gradient and the running statistics (float64 truth, torch's
own fp32 error as the yardstick), in both memory formats; ``fastarch.convert`` of the
reference; the kernels an eval forward launches; the profile's units.

The interpreter cannot afford torchvision's widths: the forward tests run ResNet-18's layout
(two BasicBlocks a layer: identity, stride-2 and downsample blocks) and a Bottleneck ResNet
of one block a layer (its first block downsamples at stride 1, the others at stride 2) at
SMALL_WIDTHS, on 2 images of 32x32 (layer4 sees 1x1) in eval and of 64x64 in training:
a training BatchNorm over the 2 values of a 1x1 layer4 is so ill-conditioned that torch's
and our rounding errors differ by hundreds of times (BatchNorm kernels alone, fused or not);
over 8 they agree."""
import copy
from collections import Counter

import pytest
import torch

import fastarch
from fastarch import functional, fusion, models, profile
from fastarch.inventory import torch_twin, trace_leaves
from fastarch.models.resnet import ResNet
from fastarch.nn.residual import ResidualBlock, fusable_block
from fastarch.testing import assert_close, random_input
from model_cases import assert_as_accurate_as_torch, ieee_fp32, run_model
import resnet_reference
from resnet_reference import torchvision_resnet

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
SMALL_WIDTHS = (4, 8, 16, 32)
INPUT_SHAPE = (2, 3, 32, 32)
TRAIN_INPUT_SHAPE = (2, 3, 64, 64)
# name -> (block, layers) of the small cases
CASES = {"resnet18": (models.BasicBlock, (2, 2, 2, 2)),
         "bottleneck": (models.Bottleneck, (1, 1, 1, 1))}


def _ours(case: str, **kwargs) -> ResNet:
    block, layers = CASES[case]
    return ResNet(block, layers, num_classes=10, widths=SMALL_WIDTHS, **kwargs)


def _reference(case: str) -> resnet_reference.ResNet:
    block = {models.BasicBlock: resnet_reference.BasicBlock,
             models.Bottleneck: resnet_reference.Bottleneck}[CASES[case][0]]
    return resnet_reference.ResNet(block, CASES[case][1], num_classes=10, widths=SMALL_WIDTHS)


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    with torch.device("meta"):  # full size, no memory and no initialisation cost
        ours = getattr(models, name)().state_dict()
        theirs = torchvision_resnet(name).state_dict()
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert (ours[key].shape, ours[key].dtype) == (tensor.shape, tensor.dtype), key


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_are_built_from_fastarch_modules_with_torchvisions_names(name):
    with torch.device("meta"):
        model = getattr(models, name)()
    for path, module in model.named_modules():
        if type(module) is torch.nn.Sequential:
            continue
        assert type(module).__module__.startswith("fastarch."), f"{path}: {type(module)}"
    block = model.layer2[0]
    names = ["conv1", "bn1", "relu", "conv2", "bn2"] + (["conv3", "bn3"] if name == "resnet50"
                                                        else [])
    for attribute in names + ["downsample"]:
        assert isinstance(getattr(block, attribute), torch.nn.Module), attribute
    assert model.layer1[1].downsample is None and block.stride == 2


def test_resnets_take_torchvisions_arguments():
    with torch.device("meta"):
        model = models.resnet50(num_classes=7, weights=None, progress=False)
        dilated = models.resnet50(replace_stride_with_dilation=[False, True, True])
    assert model.fc.out_features == 7 and model.fc.in_features == 2048
    # torchvision's: a layer's first block keeps the dilation before it, the rest take its own
    assert [(b.conv2.stride, b.conv2.dilation) for b in dilated.layer4] == \
        [((1, 1), (2, 2)), ((1, 1), (4, 4)), ((1, 1), (4, 4))]
    with pytest.raises(ValueError, match="weights=None"):
        models.resnet18(weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="3-element tuple"):
        models.resnet18(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="only supports groups=1"):
        models.BasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        models.BasicBlock(8, 8, dilation=2)


@pytest.mark.parametrize("zero_init_residual", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_from_the_same_seed_the_weights_are_torchvisions(case, zero_init_residual):
    torch.manual_seed(3)
    ours = _ours(case, zero_init_residual=zero_init_residual).state_dict()
    torch.manual_seed(3)
    block, layers = {"resnet18": (resnet_reference.BasicBlock, (2, 2, 2, 2)),
                     "bottleneck": (resnet_reference.Bottleneck, (1, 1, 1, 1))}[case]
    theirs = resnet_reference.ResNet(block, layers, 10, zero_init_residual,
                                     SMALL_WIDTHS).state_dict()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    last_bn = "layer1.0.bn2.weight" if case == "resnet18" else "layer1.0.bn3.weight"
    assert torch.all((ours[last_bn] == 0) == zero_init_residual)


def test_models_are_built_fused_unless_asked_not_to():
    with torch.device("meta"):
        model = models.resnet18()
        unfused = models.resnet18(fused=False)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 8 and all(block.fused for block in blocks) and model.fused
    assert not any(m.fused for m in unfused.modules() if isinstance(m, ResidualBlock))
    assert fusion.fused_runs(model) == [("conv1", "bn1", "relu", "maxpool")]


# --------------------------------------------------------------------------- values

def check(ours: torch.nn.Module, reference: torch.nn.Module, device: str, training: bool,
          channels_last: bool, backward: bool = True) -> None:
    """``ours`` against ``reference`` holding its weights, on one input in the given memory
    format: output, buffers (running statistics) and, with ``backward``, every gradient."""
    reference.load_state_dict(ours.state_dict())
    exact_model = copy.deepcopy(reference).double()
    x = random_input(TRAIN_INPUT_SHAPE if training else INPUT_SHAPE, torch.float32, "cpu",
                     channels_last)
    with ieee_fp32():
        exact = run_model(exact_model, x.double(), training, backward, autocast=False)
        torchs = run_model(reference, x, training, backward, autocast=False)
        results = run_model(ours.to(device), x.to(device), training, backward, autocast=False)
    assert results.keys() == exact.keys()
    for name, value in exact.items():
        assert_as_accurate_as_torch(results[name], torchs[name], value, torch.float32, name)


# Each case in each mode, each mode in both memory formats (the kernels' layout paths are
# their own tests').
VALUE_RUNS = [("resnet18", "train", False), ("resnet18", "eval", True),
              ("bottleneck", "train", True), ("bottleneck", "eval", False)]


@pytest.mark.slow
@pytest.mark.parametrize("case, mode, channels_last", VALUE_RUNS,
                         ids=[f"{c}-{m}-{'nhwc' if cl else 'nchw'}" for c, m, cl in VALUE_RUNS])
def test_resnet_matches_torch_reference(case, mode, channels_last, device):
    """Eval with gradients runs the BatchNorms on running statistics unfolded (their
    parameters need gradients); the folded inference path is the next test's."""
    check(_ours(case), _reference(case), device, mode == "train", channels_last)


@pytest.mark.parametrize("case", list(CASES))
def test_inference_matches_torch_reference(case, device):
    """No gradient: every BatchNorm that can fold into its conv does."""
    ours, reference = _ours(case), _reference(case)
    _randomise_running_statistics(ours)
    reference.load_state_dict(ours.state_dict())
    x = random_input(INPUT_SHAPE, torch.float32, "cpu", channels_last=True)
    with torch.no_grad(), ieee_fp32():
        y = ours.to(device).eval()(x.to(device))
        exact = copy.deepcopy(reference).double().eval()(x.double())
        torchs = reference.eval()(x)
    assert_as_accurate_as_torch(y, torchs, exact, torch.float32, "output")


def _randomise_running_statistics(model: torch.nn.Module) -> None:
    """Running statistics and affine parameters away from their initial 0 / 1, so that a
    fold that dropped any of them would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_unfused_resnet_matches_torch_reference(device):
    """torchvision's forward (``out += identity`` in place) on fastarch's modules."""
    check(fusion.unfuse(_ours("bottleneck")), _reference("bottleneck"), device, training=False,
          channels_last=True)


# --------------------------------------------------------------------------- the block's end

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_add_relu_matches_torch(training, device):
    """relu(batch_norm(x) + residual), the residual in the other memory format (strided),
    against float64 torch: output, every gradient, the running statistics."""
    x = random_input((2, 5, 6, 7), torch.float32, device, requires_grad=True)
    residual = random_input((2, 5, 6, 7), torch.float32, device, channels_last=True,
                            requires_grad=True)
    weight, bias = (random_input((5,), torch.float32, device, requires_grad=True)
                    for _ in range(2))
    running = [torch.zeros(5, device=device), torch.ones(5, device=device)]
    exact_running = [t.double().cpu() for t in running]
    y = functional.batch_norm_add_relu(x, residual, *running, weight, bias, training, 0.1, 1e-5)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, residual, weight, bias)]
    exact = torch.relu(torch.nn.functional.batch_norm(
        leaves[0], *exact_running, leaves[2], leaves[3], training, 0.1, 1e-5) + leaves[1])
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(device, y.dtype))
    exact.backward(dy)
    assert_close(y, exact, torch.float32, 84)
    for name, ours, theirs in zip(("x", "residual", "weight", "bias"),
                                  (x, residual, weight, bias), leaves):
        assert_close(ours.grad, theirs.grad, torch.float32, 84, name=f"grad {name}")
    for ours, theirs in zip(running, exact_running):
        assert_close(ours, theirs, torch.float32, 84, name="running statistics")


def test_batch_norm_add_relu_refuses_a_residual_of_another_shape():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="residual of its shape"):
        functional.batch_norm_add_relu(x, x[:, :2], None, None, training=True)


# --------------------------------------------------------------------------- convert

# The converted blocks run the code of test_resnet_matches_torch_reference: each case once.
CONVERT_RUNS = [("resnet18", "eval"), ("bottleneck", "train")]


@pytest.mark.slow
@pytest.mark.parametrize("case, mode", CONVERT_RUNS, ids=[f"{c}-{m}" for c, m in CONVERT_RUNS])
def test_converted_reference_computes_what_torch_does(case, mode, device):
    reference = _reference(case)
    state = {key: t.clone() for key, t in reference.state_dict().items()}
    converted = fastarch.convert(copy.deepcopy(reference))
    assert type(converted) is ResNet
    blocks = [m for m in converted.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == sum(CASES[case][1]) and all(block.fused for block in blocks)
    assert list(converted.state_dict()) == list(state)
    assert all(torch.equal(converted.state_dict()[key], t) for key, t in state.items())
    check(converted, reference, device, mode == "train", channels_last=mode == "eval",
          backward=mode == "train")


def test_convert_shares_parameters_and_leaves_other_classes_alone():
    reference = _reference("resnet18")
    parameters = list(reference.parameters())
    renamed = type("MyBlock", (resnet_reference.BasicBlock,), {})
    reference.layer1[1].__class__ = renamed  # a user's subclass: its forward may differ
    converted = fastarch.convert(reference)
    assert converted is reference
    assert all(p is q for p, q in zip(converted.parameters(), parameters))
    assert type(converted.layer1[0]) is models.BasicBlock
    assert type(converted.layer1[1]) is renamed


# --------------------------------------------------------------------------- kernels


def _launched(kernels_run: list[str], run) -> list[str]:
    kernels_run.clear()
    run()
    return list(kernels_run)


# The kernel-count model: ResNet-18 at a quarter of torchvision's widths, so that, as at
# full width, only the stem has fewer than 16 input channels; 64x64, so that the head's
# average pool is not the identity.
COUNT_WIDTHS = (16, 32, 64, 128)
COUNT_INPUT_SHAPE = (1, 3, 64, 64)
# Beside one conv2d_forward_kernel per conv (BatchNorm folded in, the residual add and ReLU
# in a block's last conv's epilogue): the stem's input conversion (its 3 channels padded
# into the copy the first-layer path reads, ``ops.conv2d.run_copy``), the stem's max pool
# (after the conv: an eval ConvRun folds the BatchNorm and ReLU into the conv, not the pool)
# and the head.
STEM_AND_HEAD = ("padded_copy_kernel", "max_pool2d_forward_kernel",
                 "adaptive_avg_pool2d_kernel", "linear_gemm_kernel")


def test_an_eval_forward_launches_one_kernel_per_conv_plus_the_stem_and_the_head(
        device, kernels_run):
    model = models.resnet18(num_classes=10, widths=COUNT_WIDTHS).to(device).eval()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    x = random_input(COUNT_INPUT_SHAPE, torch.float32, device, channels_last=True)
    with torch.no_grad():
        launched = Counter(_launched(kernels_run, lambda: model(x)))
    assert launched == Counter({"conv2d_forward_kernel": convs,
                                **dict.fromkeys(STEM_AND_HEAD, 1)}), launched


def test_a_training_step_launches_no_standalone_relu_add_or_statistics_kernel(
        device, kernels_run):
    model = _ours("bottleneck").to(device).train()
    x = random_input(INPUT_SHAPE, torch.float32, device, channels_last=True)
    launched = _launched(kernels_run, lambda: model(x).sum().backward())
    standalone = [k for k in launched if k.startswith(("relu_forward", "welford"))]
    assert not standalone, launched


# --------------------------------------------------------------------------- profile

def test_profile_units_are_the_stem_run_each_block_and_the_head():
    """``python -m fastarch profile resnet50``'s units, and its ranges keep the blocks fused."""
    model = _ours("bottleneck")
    leaves = trace_leaves(torch_twin(model).to("meta"), torch.empty(INPUT_SHAPE, device="meta"))
    runs, blocks = fusion.fused_runs(model), profile.residual_blocks(model)
    grouped = profile.units(leaves, [*runs, *profile.block_runs(leaves, blocks)])
    assert [profile.block_of(unit[0].path, blocks) or unit[0].path for unit in grouped] == \
        ["conv1", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "avgpool", "fc"]
    # conv1 bn1 relu conv2 bn2 relu conv3 bn3 downsample.0 downsample.1 relu
    assert len(grouped[1]) == 11
    handles = profile.module_ranges(model, runs)
    try:
        for path in blocks:
            block = model.get_submodule(path)
            pairs = [(block.get_submodule(c), block.get_submodule(b)) for c, b in block.pairs]
            assert fusable_block(pairs, block.relu, block.downsample), path
    finally:
        for handle in handles:
            handle.remove()
