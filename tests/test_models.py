"""fastarch.models: state_dict keys and shapes as torchvision's (written out here, so no
torchvision is needed; with torchvision installed its models are loaded too), torchvision's
arguments and initialisation, and every model's forward and gradients against torch.nn
references holding the same weights (``MODEL_RUNS`` says which mode runs what).

The forward tests shrink what the interpreter cannot afford, keeping each model's layout
(``model_cases.CASES``): 32-wide classifiers, AlexNet at its smallest input (63x63) with a
quarter of torchvision's channels, VGG at 32x32 with an eighth.

Models are built fused (``fused=False`` runs module by module): the last section counts the
kernels a training step launches."""
from collections import Counter

import pytest
import torch

from fastarch import fusion, models
from fastarch.kernels.launch import Launch
from fastarch.models.vgg import VGG, make_layers
from fastarch.nn import FusedSequential
from model_cases import CASES, TorchvisionVGG, check_against_reference, ieee_fp32

# --------------------------------------------------------------------------- expected keys

# torchvision's feature indices of each convolution and its output channels.
VGG_CONVS = {
    "vgg11": ([0, 3, 6, 8, 11, 13, 16, 18], [64, 128, 256, 256, 512, 512, 512, 512]),
    "vgg11_bn": ([0, 4, 8, 11, 15, 18, 22, 25], [64, 128, 256, 256, 512, 512, 512, 512]),
    "vgg13": ([0, 2, 5, 7, 10, 12, 15, 17, 20, 22],
              [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]),
    "vgg13_bn": ([0, 3, 7, 10, 14, 17, 21, 24, 28, 31],
                 [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]),
    "vgg16": ([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
              [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
    "vgg16_bn": ([0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40],
                 [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
    "vgg19": ([0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
              [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]),
    "vgg19_bn": ([0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49],
                 [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]),
}
# (index, in, out, kernel) of each AlexNet convolution, and the classifier's Linear indices.
ALEXNET_CONVS = {
    "alexnet": [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3),
                (10, 256, 256, 3)],
    "compact_alexnet": [(0, 3, 64, 11), (3, 64, 128, 5), (6, 128, 256, 3), (8, 256, 256, 3)],
}
LENET_KEYS = {
    "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
    "fc1.weight": (120, 400), "fc1.bias": (120,),
    "fc2.weight": (84, 120), "fc2.bias": (84,),
    "fc3.weight": (10, 84), "fc3.bias": (10,),
}


def _conv_keys(prefix: str, c_in: int, c_out: int, kernel: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (c_out, c_in, kernel, kernel), f"{prefix}.bias": (c_out,)}


def _batch_norm_keys(prefix: str, channels: int) -> dict[str, tuple]:
    keys = {f"{prefix}.{name}": (channels,)
            for name in ("weight", "bias", "running_mean", "running_var")}
    keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def _classifier_keys(indices: tuple[int, int, int], in_features: int) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for index, (c_in, c_out) in zip(indices, ((in_features, 4096), (4096, 4096), (4096, 1000))):
        keys.update({f"classifier.{index}.weight": (c_out, c_in),
                     f"classifier.{index}.bias": (c_out,)})
    return keys


def expected_keys(name: str) -> dict[str, tuple]:
    """torchvision's state_dict (the notes' for lenet5 and compact_alexnet): key -> shape,
    in order."""
    if name == "lenet5":
        return LENET_KEYS
    keys: dict[str, tuple] = {}
    if name in ALEXNET_CONVS:
        for index, c_in, c_out, kernel in ALEXNET_CONVS[name]:
            keys.update(_conv_keys(f"features.{index}", c_in, c_out, kernel))
        return {**keys, **_classifier_keys((1, 4, 6), 256 * 6 * 6)}
    indices, channels = VGG_CONVS[name]
    for index, c_in, c_out in zip(indices, [3] + channels[:-1], channels):
        keys.update(_conv_keys(f"features.{index}", c_in, c_out, 3))
        if name.endswith("_bn"):
            keys.update(_batch_norm_keys(f"features.{index + 1}", c_out))
    return {**keys, **_classifier_keys((0, 3, 6), 512 * 7 * 7)}


MODEL_NAMES = ["lenet5", "alexnet", "compact_alexnet", *VGG_CONVS]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    with torch.device("meta"):  # full size, no memory and no initialisation cost
        state = getattr(models, name)().state_dict()
    assert {key: tuple(t.shape) for key, t in state.items()} == expected_keys(name)
    assert list(state) == list(expected_keys(name)), "key order differs"
    for key, tensor in state.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert tensor.dtype == expected, f"{key}: {tensor.dtype}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_are_built_from_fastarch_modules(name):
    with torch.device("meta"):
        model = getattr(models, name)()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential) or module is model:
            continue
        assert type(module).__module__.startswith("fastarch.nn"), \
            f"{path} is {type(module).__module__}.{type(module).__name__}"


# --------------------------------------------------------------------------- arguments, init

def _small_vgg(**kwargs) -> VGG:
    return VGG(make_layers([8, "M", 16, "M"], batch_norm=True), hidden_features=32, **kwargs)


def test_vgg_and_alexnet_take_torchvisions_arguments():
    with torch.device("meta"):
        vgg = models.vgg16_bn(num_classes=7, dropout=0.25, init_weights=False)
        alexnet = models.alexnet(num_classes=5, dropout=0.125)
        lenet = models.lenet5(num_classes=3)
    assert vgg.classifier[6].out_features == 7
    assert [m.p for m in vgg.classifier if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]
    assert alexnet.classifier[6].out_features == 5
    assert [m.p for m in alexnet.classifier if isinstance(m, torch.nn.Dropout)] == [0.125, 0.125]
    assert lenet.fc3.out_features == 3


def test_vgg_initialisation_is_torchvisions():
    model = _small_vgg()
    conv, bn, linear = model.features[0], model.features[1], model.classifier[0]
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.25)
    assert torch.all(conv.bias == 0) and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(linear.bias == 0)


def test_vgg_init_weights_false_keeps_torchs_default_initialisation():
    model = _small_vgg(init_weights=False)
    assert not torch.all(model.features[0].bias == 0)
    assert not torch.all(model.classifier[0].bias == 0)


def _torchvision_vgg_init(model: torch.nn.Module) -> None:
    """torchvision's VGG.__init__ initialisation, in its order."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.constant_(m.bias, 0)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(m.weight, 1)
            torch.nn.init.constant_(m.bias, 0)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.01)
            torch.nn.init.constant_(m.bias, 0)


def test_vgg_from_the_same_seed_has_torchvisions_weights():
    torch.manual_seed(3)
    ours = _small_vgg().state_dict()
    torch.manual_seed(3)
    reference = TorchvisionVGG([8, "M", 16, "M"], True, 32, 1000, 0.5)
    _torchvision_vgg_init(reference)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(ours[key], tensor), key


def test_vgg_without_a_convolution_is_refused():
    with pytest.raises(ValueError, match="features must contain a Conv2d"):
        VGG(torch.nn.Sequential(torch.nn.Identity()))


def test_alexnet_needs_two_widths():
    with pytest.raises(ValueError, match="widths"):
        models.AlexNet(widths=(64,))


# --------------------------------------------------------------------------- forward, grads

# (model, mode, backward). Training runs dropout with p = 0 (our Philox masks differ from
# torch's by design); eval keeps torchvision's p = 0.5, which eval switches off, and BatchNorm
# reads its running statistics. LeNet-5, both AlexNets and VGG11-BN run forward and backward
# in training. In eval only dropout and BatchNorm change: VGG11-BN runs forward and
# backward, the dropout models forward (LeNet-5 has neither). The other VGGs repeat those
# layers, their backward would rerun the same kernels (at 10 s a model in the interpreter),
# so they run forward only: VGG11 (AlexNet's conv-ReLU runs, max pools and classifier in
# VGG11-BN's layout), and VGG13/16/19, whose forward checks their longer lists, each depth
# once (make_layers inserts the BatchNorms alike in every list: one of them with BatchNorm).
MODEL_RUNS = [
    ("lenet5", "train", True),
    ("alexnet", "train", True), ("alexnet", "eval", False),
    ("compact_alexnet", "train", True),
    ("vgg11", "train", False), ("vgg11", "eval", False),
    ("vgg11_bn", "train", True), ("vgg11_bn", "eval", True),
    ("vgg13", "train", False), ("vgg16_bn", "train", False), ("vgg19", "train", False),
]


@pytest.mark.parametrize("name, mode, backward", MODEL_RUNS,
                         ids=[f"{n}-{m}{'' if b else '-forward'}" for n, m, b in MODEL_RUNS])
def test_model_matches_torch_reference(name, mode, backward, device):
    case = CASES[name]
    dropout = 0.0 if mode == "train" else 0.5
    with ieee_fp32():
        check_against_reference(case.ours(dropout), case.reference(dropout), case.input_shape,
                                device, mode == "train", backward)


@pytest.mark.parametrize("name", ["lenet5", "vgg11_bn"])
def test_unfused_model_matches_torch_reference(name, device):
    case = CASES[name]
    model = fusion.unfuse(case.ours(0.0))
    with ieee_fp32():
        check_against_reference(model, case.reference(0.0), case.input_shape, device,
                                training=True)


def test_lenet5_under_bf16_autocast_matches_torch_reference(device):
    case = CASES["lenet5"]
    check_against_reference(case.ours(0.0), case.reference(0.0), case.input_shape, device,
                            training=True, autocast=True)


# --------------------------------------------------------------------------- torchvision

TORCHVISION_NAMES = ["alexnet", *VGG_CONVS]


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_state_dict_loads_and_matches_with_the_same_seed(name):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed: "
                                      "the written-out keys above stand in for it")
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=10).state_dict()
    torch.manual_seed(0)
    ours = getattr(models, name)(num_classes=10)
    assert list(ours.state_dict()) == list(theirs)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[key]), f"{key}: initialised differently"
    ours.load_state_dict(theirs)


# --------------------------------------------------------------------------- fused by default

# The runs each model fuses as built: VGG's conv-bn-relu(-pool) / conv-relu runs and
# classifier linear-relu-dropout runs, AlexNet's conv-relu and linear-relu(-dropout) runs
# (its leading Dropout alone), LeNet-5's conv-relu and fc-relu pairs.
FUSED_RUNS = {
    "lenet5": [("conv1", "relu1"), ("conv2", "relu2"), ("fc1", "relu3"), ("fc2", "relu4")],
    "alexnet": [("features.0", "features.1"), ("features.3", "features.4"),
                ("features.6", "features.7"), ("features.8", "features.9"),
                ("features.10", "features.11"), ("classifier.1", "classifier.2", "classifier.3"),
                ("classifier.4", "classifier.5")],
    "vgg11_bn": [*(tuple(f"features.{i + k}" for k in range(length))
                   for i, length in ((0, 4), (4, 4), (8, 3), (11, 4), (15, 3), (18, 4), (22, 3),
                                     (25, 4))),
                 ("classifier.0", "classifier.1", "classifier.2"),
                 ("classifier.3", "classifier.4", "classifier.5")],
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_are_built_fused_unless_asked_not_to(name):
    with torch.device("meta"):
        model = getattr(models, name)()
        unfused = getattr(models, name)(fused=False)
    assert list(unfused.state_dict()) == list(model.state_dict())
    runs = fusion.fused_runs(model)
    assert runs, name
    if name in FUSED_RUNS:
        assert runs == FUSED_RUNS[name]
    if name == "lenet5":
        assert model.fused and not unfused.fused
        return
    assert type(model.features) is type(model.classifier) is FusedSequential
    assert type(unfused.features) is type(unfused.classifier) is torch.nn.Sequential


def _kernel_name(launch: Launch) -> str:
    """The kernel of a launch, without its config: "relu_forward[...]" -> "relu_forward"."""
    return (launch.name or launch.kernel.__name__).split("[")[0]


def _training_step_launches(model: torch.nn.Module, input_shape: tuple, device: str,
                            monkeypatch) -> Counter:
    """The kernels one training forward + backward of ``model`` launches, by name."""
    launched: Counter = Counter()
    launch = Launch.__call__

    def counted(self: Launch) -> None:
        launched[_kernel_name(self)] += 1
        launch(self)

    monkeypatch.setattr(Launch, "__call__", counted)
    x = torch.randn(input_shape, device=device)
    model.to(device).train()(x).sum().backward()
    monkeypatch.undo()
    return launched


def _standalone(launched: Counter) -> set[str]:
    """The ReLU, dropout and BatchNorm statistics kernels among ``launched``: what a fused
    run does inside its conv, GEMM and normalising kernels instead."""
    return {kernel for kernel in launched
            if kernel.startswith(("relu", "dropout")) or "welford" in kernel}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", ["vgg11_bn", "lenet5"])
def test_a_fused_training_step_launches_no_relu_dropout_or_statistics_kernel(name, fused,
                                                                             device,
                                                                             monkeypatch):
    """VGG11-BN (an eighth of its channels, dropout 0.5) and LeNet-5 as built: the only
    kernels of a training step are the convs (with the BatchNorm partials and ReLU in their
    epilogue), the finalize, the normalise (+ ReLU + pool) passes, the GEMMs (ReLU and
    dropout in their epilogue), the pools and their backward passes, and for a conv -> ReLU
    run without BatchNorm (LeNet-5's) one pass masking its output gradient, which its dgrad
    and wgrad both read. Unfused, the same model launches each ReLU, dropout and statistics
    pass of its own."""
    case = CASES[name]
    model = case.ours(0.5)
    if not fused:
        fusion.unfuse(model)
    launched = _training_step_launches(model, case.input_shape, device, monkeypatch)
    assert any(kernel.startswith("conv2d") for kernel in launched), launched
    standalone = _standalone(launched)
    if fused:
        conv_relu_masks = launched["relu_backward"]
        assert conv_relu_masks == (2 if name == "lenet5" else 0), launched  # conv1, conv2
        assert not standalone - {"relu_backward"}, f"standalone kernels: {standalone}"
        return
    expected = {"relu_forward", "relu_backward"}
    if name == "vgg11_bn":
        expected |= {"dropout", "batch_norm_welford_partials"}
    assert standalone >= expected, launched
