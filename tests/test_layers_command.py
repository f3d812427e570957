"""``python -m fastarch layers`` (``fastarch.layers``): the distinct layers it finds in the
models, and its check, which passes fastarch's layers and fails a wrong output, a wrong
gradient and a dropout that does not drop."""
import pytest
import torch

from fastarch import functional, layers, nn


def test_distinct_layers_of_lenet5_are_every_leaf_once():
    network = layers.SMALL[0]
    leaves = layers.distinct_layers(network, network.build(), torch.float32)
    assert [leaf.path for leaf in leaves] == ["conv1", "relu1", "pool1", "conv2", "relu2",
                                              "pool2", "fc1", "relu3", "fc2", "relu4", "fc3"]
    assert leaves[0].input_shape == network.input_shape


def test_distinct_layers_of_vgg16_bn_keep_one_of_each_repeat():
    network = layers.SMALL[2]
    with torch.device("meta"):
        model = network.build()
    leaves = layers.distinct_layers(network, model, torch.float32)
    paths = [leaf.path for leaf in leaves]
    assert "features.20" not in paths, "conv3_3 repeats conv3_2 at the same shape"
    assert {"features.0", "features.1", "features.2", "features.6", "avgpool", "classifier.0",
            "classifier.2"} <= set(paths)
    kinds = {type(leaf.module).__name__ for leaf in leaves}
    assert kinds == {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d",
                     "Linear", "Dropout"}


@pytest.mark.parametrize("module, shape, output_shape", [
    (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5), (2, 3, 5, 5)),
    (nn.BatchNorm2d(3), (2, 3, 4, 4), (2, 3, 4, 4)),
    (nn.ReLU(inplace=True), (2, 3, 4, 4), (2, 3, 4, 4)),
    (nn.MaxPool2d(2), (2, 3, 4, 4), (2, 3, 2, 2)),
    (nn.Linear(6, 4), (3, 6), (3, 4)),
    (nn.Dropout(0.5), (16, 32), (16, 32)),
], ids=["conv", "bn", "relu", "pool", "linear", "dropout"])
def test_fastarch_layers_pass_the_check(module, shape, output_shape, device):
    result = layers.check_layer(module.to(device), shape, output_shape, torch.float32, device,
                                gpu=False)
    assert result.agrees, result


def test_a_wrong_output_or_gradient_fails_the_check(device, monkeypatch):
    conv = nn.Conv2d(2, 3, 3).to(device)
    conv2d = functional.conv2d
    monkeypatch.setattr(functional, "conv2d", lambda *args: conv2d(*args) * 1.01)
    assert not layers.check_layer(conv, (2, 2, 5, 5), (2, 3, 3, 3), torch.float32, device,
                                  gpu=False).agrees
    monkeypatch.undo()

    def doubled_gradient(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        y = torch.relu(x)
        return y + (y - y.detach())  # relu's value, twice its gradient

    monkeypatch.setattr(functional, "relu", doubled_gradient)
    shape = (2, 3, 4, 4)
    assert not layers.check_layer(nn.ReLU(), shape, shape, torch.float32, device,
                                  gpu=False).agrees


def test_a_dropout_that_does_not_drop_fails_the_check(device, monkeypatch):
    monkeypatch.setattr(functional, "dropout", lambda x, p, training, inplace: x * 2.0)
    result = layers.check_layer(nn.Dropout(0.5), (16, 32), (16, 32), torch.float32, device,
                                gpu=False)
    assert not result.agrees


def test_the_command_prints_a_row_per_layer_and_a_summary(device, monkeypatch, capsys):
    tiny = layers.Network("Tiny", lambda: torch.nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(),
                                                              nn.MaxPool2d(2)), (2, 1, 6, 6))
    monkeypatch.setattr(layers, "SMALL", (tiny,))
    monkeypatch.setattr(layers, "FULL", (tiny,))
    assert layers.main(["--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("Tiny ")]
    assert [row.split()[1] for row in rows] == ["0:", "1:", "2:"]
    assert all(row.endswith("ok") for row in rows)
    assert "3/3 layers as accurate as torch's own float32" in "\n".join(lines)
