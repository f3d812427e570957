"""Serialization: whole fastarch models (fused ones too: their Sequentials are
FusedSequential instances, class swapped in place) pickle through torch.save / torch.load;
state_dicts load into fresh models with ``weights_only=True``; and checkpoints move both ways
between fastarch models and plain torch.nn models of torchvision's layout (torchvision itself
is not needed: its layouts are written out here, independently of ``fastarch.models``)."""
import io

import pytest
import torch

from fastarch import fusion, models, nn
from fastarch.nn.fused import FusedSequential
from fastarch.testing import assert_close, random_input
from tiny_net import INPUT_SHAPE, TinyNet, randomize_batch_norm


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _variant(name: str, dropout: float = 0.5) -> torch.nn.Module:
    model = randomize_batch_norm(TinyNet(dropout))
    if name == "fused":
        return fusion.fuse(model)
    if name == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Eval without autograd (the fused fold), eval with autograd, and a training forward
    from a fixed dropout seed (which also moves the running statistics)."""
    model.eval()
    with torch.no_grad():
        outputs = [model(x)]
    outputs.append(model(x).detach())
    torch.manual_seed(7)
    outputs.append(model.train()(x).detach())
    return outputs


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), name


@pytest.mark.parametrize("variant", ["modules", "fused", "sync"])
def test_whole_model_round_trips_through_torch_save(device, variant):
    model = _variant(variant).to(device)
    x = random_input(INPUT_SHAPE, torch.float32, device)
    model(x).sum().backward()  # trained state: moved running statistics, a batch count
    with torch.no_grad():
        model.eval()(x)  # a fused model folds its BatchNorm: nothing of it may pickle along
    loaded = torch.load(_saved(model), weights_only=False)  # whole models need pickle
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert (type(loaded.features) is FusedSequential) == (variant == "fused")
    _assert_same_state(loaded.state_dict(), model.state_dict())
    for actual, expected in zip(_outputs(loaded, x), _outputs(model, x)):
        assert_close(actual, expected.double(), torch.float32, 16 * 9)
    _assert_same_state(loaded.state_dict(), model.state_dict())


def test_loaded_fused_model_refolds_after_its_statistics_change(device):
    """A loaded fused model folds the statistics it has now, not those it was saved with."""
    model = fusion.fuse(randomize_batch_norm(TinyNet())).to(device).eval()
    x = random_input(INPUT_SHAPE, torch.float32, device)
    with torch.no_grad():
        model(x)
        loaded = torch.load(_saved(model), weights_only=False)
        for bn in (loaded.features[1], loaded.features[5]):
            bn.running_var.mul_(4.0)
            bn.running_mean.add_(1.0)
        expected = fusion.unfuse(torch.load(_saved(loaded), weights_only=False))(x)
        assert_close(loaded(x), expected.double(), torch.float32, 16 * 9)


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_state_dict_loads_into_a_fresh_model_weights_only(device, fused):
    model = _variant("fused" if fused else "modules").to(device)
    x = random_input(INPUT_SHAPE, torch.float32, device)
    model(x).sum().backward()
    state = torch.load(_saved(model.state_dict()), weights_only=True)
    torch.manual_seed(123)  # a fresh model with other weights
    fresh = _variant("fused" if fused else "modules").to(device)
    fresh.load_state_dict(state)
    _assert_same_state(fresh.state_dict(), model.state_dict())
    for actual, expected in zip(_outputs(fresh, x), _outputs(model, x)):
        assert_close(actual, expected.double(), torch.float32, 16 * 9)


# ----------------------------------------------------------------------------- torch.nn layouts

class TorchTinyNet(torch.nn.Module):
    """``tiny_net.TinyNet`` written with torch.nn only, index for index."""

    def __init__(self) -> None:
        super().__init__()
        nn_ = torch.nn
        self.features = nn_.Sequential(
            nn_.Conv2d(3, 8, 3, padding=1), nn_.BatchNorm2d(8), nn_.ReLU(inplace=True),
            nn_.MaxPool2d(2),
            nn_.Conv2d(8, 16, 3, padding=1), nn_.BatchNorm2d(16), nn_.ReLU(inplace=True),
            nn_.AvgPool2d(2),
            nn_.Conv2d(16, 16, 3, padding=1), nn_.ReLU(inplace=True))
        self.avgpool = nn_.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn_.Sequential(nn_.Dropout(0.0), nn_.Linear(144, 32),
                                         nn_.ReLU(inplace=True), nn_.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_checkpoints_move_between_fastarch_and_torch_nn(device, fused):
    torch_model = randomize_batch_norm(TorchTinyNet()).to(device)
    fast = _variant("fused" if fused else "modules", dropout=0.0).to(device)  # torch's masks differ
    fast.load_state_dict(torch.load(_saved(torch_model.state_dict()), weights_only=True))
    x = random_input(INPUT_SHAPE, torch.float32, device)
    for actual, expected in zip(_outputs(fast, x), _outputs(torch_model, x)):
        assert_close(actual, expected.double(), torch.float32, 16 * 9)

    fast(x).sum().backward()  # fastarch moves on; its checkpoint goes back to torch.nn
    torch_model.load_state_dict(torch.load(_saved(fast.state_dict()), weights_only=True))
    _assert_same_state(torch_model.state_dict(), fast.state_dict())


def torchvision_alexnet(num_classes: int = 1000) -> torch.nn.Module:
    """torchvision.models.AlexNet's modules and indices, in plain torch.nn."""
    nn_ = torch.nn
    model = nn_.Module()
    model.features = nn_.Sequential(
        nn_.Conv2d(3, 64, 11, 4, 2), nn_.ReLU(True), nn_.MaxPool2d(3, 2),
        nn_.Conv2d(64, 192, 5, padding=2), nn_.ReLU(True), nn_.MaxPool2d(3, 2),
        nn_.Conv2d(192, 384, 3, padding=1), nn_.ReLU(True),
        nn_.Conv2d(384, 256, 3, padding=1), nn_.ReLU(True),
        nn_.Conv2d(256, 256, 3, padding=1), nn_.ReLU(True), nn_.MaxPool2d(3, 2))
    model.avgpool = nn_.AdaptiveAvgPool2d((6, 6))
    model.classifier = nn_.Sequential(
        nn_.Dropout(), nn_.Linear(256 * 6 * 6, 4096), nn_.ReLU(True), nn_.Dropout(),
        nn_.Linear(4096, 4096), nn_.ReLU(True), nn_.Linear(4096, num_classes))
    return model


def torchvision_vgg_bn(config: list, num_classes: int = 1000) -> torch.nn.Module:
    """torchvision.models.VGG with batch norm (make_layers(cfg, batch_norm=True))."""
    nn_ = torch.nn
    layers, channels = [], 3
    for entry in config:
        if entry == "M":
            layers.append(nn_.MaxPool2d(2, 2))
        else:
            layers += [nn_.Conv2d(channels, entry, 3, padding=1), nn_.BatchNorm2d(entry),
                       nn_.ReLU(True)]
            channels = entry
    model = nn_.Module()
    model.features = nn_.Sequential(*layers)
    model.avgpool = nn_.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn_.Sequential(
        nn_.Linear(512 * 7 * 7, 4096), nn_.ReLU(True), nn_.Dropout(), nn_.Linear(4096, 4096),
        nn_.ReLU(True), nn_.Dropout(), nn_.Linear(4096, num_classes))
    return model


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"]


def test_torchvision_alexnet_checkpoint_loads_both_ways():
    """Real weights (no forward: the full-size model is too slow for the interpreter)."""
    reference = torchvision_alexnet(num_classes=10)
    fast = fusion.fuse(models.alexnet(num_classes=10))
    fast.load_state_dict(torch.load(_saved(reference.state_dict()), weights_only=True))
    _assert_same_state(fast.state_dict(), reference.state_dict())
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    reference.load_state_dict(torch.load(_saved(fast.state_dict()), weights_only=True))
    _assert_same_state(reference.state_dict(), fast.state_dict())


@pytest.mark.parametrize("name, config", [("vgg11_bn", VGG11), ("vgg16_bn", VGG16)])
def test_torchvision_vgg_bn_checkpoint_keys_and_shapes_match(name, config):
    """Full-size layouts on the meta device (no memory, no kernels): every key, shape and
    dtype, and a strict load each way."""
    with torch.device("meta"):
        reference = torchvision_vgg_bn(config)
        fast = fusion.fuse(getattr(models, name)())
    expected, actual = reference.state_dict(), fast.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert (actual[key].shape, actual[key].dtype) == (value.shape, value.dtype), key
    fast.load_state_dict(expected, assign=True)
    reference.load_state_dict(fast.state_dict(), assign=True)
