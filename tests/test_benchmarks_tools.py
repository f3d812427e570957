"""The benchmark tooling: the case table derived from the models, the costs and ceilings,
the results report (table, RESULTS.md section, roofline PNG) on synthetic pytest-benchmark
JSON, the op ranges, and ``python -m fastarch profile`` on the CPU."""
import importlib
import json
import pathlib
import sys

import pytest
import torch
from torch import nn

import fastarch.functional as FF
from fastarch import models
from fastarch import profile as profiler
from fastarch.inventory import run_cost, torch_twin, trace_leaves
from fastarch.kernels.tensor_cores import Operand
from fastarch.roofline import Cost, backward_cost, ceilings_for, forward_cost

ROOT = pathlib.Path(__file__).parents[1]


def _load(name: str):
    """A module of benchmarks/ (not a package: its conftest puts it on sys.path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def cases():
    return _load("cases")


@pytest.fixture(scope="module")
def report():
    return _load("report")


# ----------------------------------------------------------------------------- cases

def test_layer_cases_are_the_distinct_layers_at_real_shapes(cases):
    by_name = {case.name: case for case in cases.all_cases()}
    counts = {}
    for case in by_name.values():
        counts[case.model, case.kind] = counts.get((case.model, case.kind), 0) + 1
    assert counts == {
        ("lenet5", "model"): 1, ("alexnet", "model"): 1, ("vgg16", "model"): 1,
        ("vgg16_bn", "model"): 1,
        ("lenet5", "conv"): 2, ("lenet5", "pool"): 2, ("lenet5", "fc"): 3,
        ("alexnet", "conv"): 5, ("alexnet", "pool"): 3, ("alexnet", "fc"): 3,
        # 13 convs, 13 BNs: conv3_2 = conv3_3, conv4_2 = conv4_3, conv5_1..3 alike
        ("vgg16_bn", "conv"): 9, ("vgg16_bn", "bn"): 5, ("vgg16_bn", "pool"): 5,
        ("vgg16_bn", "fc"): 3, ("vgg16_bn", "block"): 12,
        ("resnet18", "model"): 1, ("resnet50", "model"): 1,
        # 53 convs, 53 BNs, by (channels, kernel, stride, input); the stem is the one block
        ("resnet50", "conv"): 23, ("resnet50", "bn"): 12, ("resnet50", "pool"): 1,
        ("resnet50", "fc"): 1, ("resnet50", "block"): 1}
    assert by_name["resnet50.conv15"].describe(False) == "conv 256->512 1x1 s2 on 128x256x56x56"
    assert by_name["vgg16_bn.conv6"].also == ("vgg16_bn.conv7",)
    assert by_name["vgg16_bn.conv11"].also == ("vgg16_bn.conv12", "vgg16_bn.conv13")
    assert by_name["vgg16_bn.conv2"].input_shape(False) == (64, 64, 224, 224)
    assert by_name["alexnet.pool1"].input_shape(False) == (256, 64, 55, 55)
    assert by_name["lenet5.fc3"].input_shape(False) == (1024, 84)
    assert by_name["vgg16_bn.conv7_block"].describe(False) == \
        "conv 256->256 3x3 p1 + bn 256 + relu + max 2x2 s2 on 64x256x56x56"
    assert by_name["vgg16_bn"].output_shape(False) == (64, 1000)


def test_quick_dry_run_and_smoke_subsets_name_existing_cases_and_modes(cases):
    by_name = {case.name: case for case in cases.all_cases()}
    for name, mode in cases.QUICK:
        assert mode in by_name[name].modes, name
    assert [(case.name, mode) for case, mode in cases.scenarios("quick")] == list(cases.QUICK)
    assert cases.QUICK[0] == cases.DRY_RUN[0] == ("vgg16_bn", "eval")  # the headline first
    assert set(cases.DRY_RUN) <= set(cases.QUICK)
    assert [(case.name, mode) for case, mode in cases.scenarios("dry-run")] == \
        list(cases.DRY_RUN)
    for name, modes in cases.SMOKE.items():
        assert set(modes) <= set(by_name[name].modes), name
    smoke = {(case.kind, mode) for case, mode in cases.scenarios("smoke")}
    assert smoke >= {(kind, mode) for kind in ("conv", "bn", "pool", "fc", "block")
                     for mode in cases.LAYER_MODES} | {("model", m) for m in cases.MODEL_MODES}


def test_smoke_models_keep_the_architecture_narrowed(cases):
    full, smoke = cases.traced("vgg16_bn", False), cases.traced("vgg16_bn", True)
    assert [leaf.path for leaf in full] == [leaf.path for leaf in smoke]
    assert smoke[0].input_shape == (1, 3, 32, 32)
    assert smoke[0].module.out_channels == full[0].module.out_channels // 16
    assert smoke[-1].output_shape == (1, 1000)
    model = cases.build("alexnet", True, "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_case_costs(cases):
    by_name = {case.name: case for case in cases.all_cases()}
    conv = by_name["vgg16_bn.conv2"]
    flops = 2 * 64 * 64 * 224 * 224 * 64 * 9
    assert conv.cost("eval", False, 2).flops == flops
    assert conv.cost("fwd_bwd", False, 2).flops == 3 * flops
    pool = by_name["vgg16_bn.pool1"].cost("eval", False, 2)
    assert pool == Cost(0, (64 * 64 * 224 * 224 + 64 * 64 * 112 * 112) * 2)
    vgg = by_name["vgg16"]
    assert vgg.cost("eval", False, 2).flops == pytest.approx(1.98e12, rel=0.01)
    first_conv = 2 * 64 * 64 * 224 * 224 * 3 * 9
    assert vgg.cost("train_step", False, 2).flops == 3 * vgg.cost("eval", False, 2).flops \
        - first_conv  # no input gradient for the image


# ----------------------------------------------------------------------------- inventory, costs

def test_torch_twin_runs_torch_classes_with_the_same_state():
    with torch.device("meta"):
        model = models.vgg11_bn()
    from fastarch.fusion import fuse
    fuse(model)
    twin = torch_twin(model)
    assert all(not type(m).__module__.startswith("fastarch.") for m in twin.features.modules())
    assert type(twin.features) is nn.Sequential and type(twin.classifier[0]) is nn.Linear
    assert list(twin.state_dict()) == list(model.state_dict())
    lenet = models.lenet5()
    twin = torch_twin(lenet)
    assert lenet.fused and not twin.fused, "the twin runs LeNet-5 module by module"
    assert type(twin.conv1) is nn.Conv2d and type(twin.relu1) is nn.ReLU


def test_trace_leaves_and_run_cost():
    twin = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2)).to("meta")
    leaves = trace_leaves(twin, torch.empty(2, 4, 8, 8, device="meta"))
    assert [(leaf.path, leaf.input_shape, leaf.output_shape) for leaf in leaves] == [
        ("0", (2, 4, 8, 8), (2, 8, 8, 8)), ("1", (2, 8, 8, 8), (2, 8, 8, 8)),
        ("2", (2, 8, 8, 8), (2, 8, 8, 8)), ("3", (2, 8, 8, 8), (2, 8, 4, 4))]
    flops = 2 * 2 * 8 * 8 * 8 * 4 * 9
    weights = 8 * 4 * 9 + 8 + 8 + 8
    block = run_cost(leaves, 2)
    assert block == Cost(flops, (2 * 4 * 64 + weights + 2 * 8 * 16) * 2)
    assert run_cost(leaves, 2, backward=True).flops == 3 * flops
    assert run_cost(leaves[:1], 2) == forward_cost(leaves[0].module, (2, 4, 8, 8),
                                                   (2, 8, 8, 8), 2)
    bn = leaves[1]
    assert backward_cost(bn.module, bn.input_shape, bn.output_shape, 4) == \
        Cost(0, 3 * 2 * 8 * 64 * 4)


def test_cost_rates_and_ceilings():
    assert Cost(flops=2e12).rate(1e-3) == pytest.approx(2000.0)
    assert Cost(bytes=4e9).rate(1e-3) == pytest.approx(4000.0)
    assert Cost(flops=1).metric == "TFLOP/s" and Cost(bytes=1).metric == "GB/s"
    assert ceilings_for("NVIDIA H100 80GB HBM3").card == "H100"
    assert ceilings_for("NVIDIA H200").copy_gbs == 4276.0
    assert ceilings_for("NVIDIA A100-SXM4-80GB") is None
    h200 = ceilings_for("NVIDIA H200")
    assert h200.peak(Cost(flops=1), Operand.of(torch.bfloat16, True)) == 798.0
    assert h200.peak(Cost(flops=1), Operand.of(torch.float32, True)) == 372.0
    assert h200.peak(Cost(flops=1), Operand.of(torch.float32, False)) == 51.0
    assert h200.peak(Cost(bytes=1), Operand.TF32) == 4276.0


# ----------------------------------------------------------------------------- timing helpers

def test_rotation_covers_twice_the_l2_and_cycles():
    timing = _load("timing")
    made = []
    next_args = timing.rotating(lambda: (made.append(len(made)) or len(made),),
                                timing.L2_BYTES // 4)
    assert len(made) == 8
    assert [next_args()[0] for _ in range(9)] == [1, 2, 3, 4, 5, 6, 7, 8, 1]
    assert timing.iterations_for(1e-6) == timing.MAX_ITERATIONS
    assert timing.iterations_for(1.0) == 1
    assert timing.iterations_for(timing.ROUND_SECONDS / 10) == 10


# ----------------------------------------------------------------------------- report

def _entry(case, mode, contender, median_s, flops=0, bytes_=0, gpu="NVIDIA H200"):
    metric = "TFLOP/s" if flops else "GB/s"
    rate = (flops / 1e12 if flops else bytes_ / 1e9) / median_s
    return {"stats": {"median": median_s},
            "extra_info": {"case": case, "mode": mode, "contender": contender, "kind": "conv",
                           "describe": f"{case} layer", "flops": flops, "bytes": bytes_,
                           metric: rate, "gpu": gpu, "torch": "2.11.0", "triton": "3.6.0",
                           "cudnn": "91900", "cuda": "13.0", "dtype": "bfloat16",
                           "tf32": True, "subset": "quick"}}


def _bench(gpu="NVIDIA H200"):
    conv = dict(flops=int(2.4e11), bytes_=int(2e8), gpu=gpu)
    pool = dict(bytes_=int(5e8), gpu=gpu)
    return {"datetime": "2026-11-26T12:00:00.000", "commit_info": {"id": "0123456789abcdef"},
            "benchmarks": [
                _entry("vgg16_bn.conv6", "eval", "eager", 3.0e-4, **conv),
                _entry("vgg16_bn.conv6", "eval", "compile", 4.0e-4, **conv),
                _entry("vgg16_bn.conv6", "eval", "fastarch", 6.0e-4, **conv),
                _entry("vgg16_bn.conv6", "eval", "tuned", 4.8e-4, **conv),
                _entry("vgg16_bn.conv6", "eval", "tma", 2.4e-4, **conv),
                _entry("vgg16_bn.pool1", "fwd_bwd", "eager", 8.0e-4, **pool),
                _entry("vgg16_bn.pool1", "fwd_bwd", "fastarch", 2.0e-4, **pool)]}


def test_summary_puts_contenders_side_by_side_with_speedups(report):
    summary = report.summarize(_bench())
    conv, pool = summary["rows"]
    assert conv["speedup_vs_eager"] == pytest.approx(0.5)
    assert conv["speedup_vs_compile"] == pytest.approx(2 / 3)
    assert pool["speedup_vs_eager"] == pytest.approx(4.0)
    assert pool["speedup_vs_compile"] is None
    assert conv["tuned_vs_static"] == pytest.approx(1.25) and pool["tuned_vs_static"] is None
    assert conv["tma_vs_eager"] == pytest.approx(1.25) and pool["tma_vs_eager"] is None
    assert summary["environment"]["gpu"] == "NVIDIA H200" and summary["commit"] == "0123456789"
    lines = report.markdown(summary).splitlines()
    assert lines[0].startswith("NVIDIA H200 · bfloat16 · channels_last · 2026-11-26T12:00")
    assert "| vgg16_bn.conv6 | eval | vgg16_bn.conv6 layer | 0.6 ms · 400 TFLOP/s | " \
           "0.48 ms · 500 TFLOP/s | 0.24 ms · 1000 TFLOP/s | 0.3 ms · 800 TFLOP/s | " \
           "0.4 ms · 600 TFLOP/s | 50% | 0.50× | 0.67× | 1.25× | 1.25× |" in lines
    assert "| vgg16_bn.pool1 | fwd_bwd | vgg16_bn.pool1 layer | 0.2 ms · 2500 GB/s | — | — | " \
           "0.8 ms · 625 GB/s | — | 58% | 4.00× | — | — | — |" in lines


def test_results_section_is_replaced_per_card_dtype_and_subset(report, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nHow the numbers are made.\n")
    h200 = report.summarize(_bench())
    report.update_results(results, h200, "first table")
    report.update_results(results, h200, "second table")
    h100 = report.summarize(_bench("NVIDIA H100 80GB HBM3"))
    report.update_results(results, h100, "h100 table")
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nHow the numbers are made.\n")
    assert "first table" not in text and text.count("second table") == 1
    assert text.index("## NVIDIA H200 bfloat16 quick") < text.index("## NVIDIA H100 80GB HBM3")


def test_report_command_writes_table_results_and_png(report, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench()))
    out = {name: tmp_path / name for name in ("table.md", "RESULTS.md", "roofline.png")}
    report.main([str(bench), "--markdown", str(out["table.md"]), "--results",
                 str(out["RESULTS.md"]), "--png", str(out["roofline.png"])])
    printed = capsys.readouterr().out
    assert printed.strip() == out["table.md"].read_text().strip()
    assert printed.strip() in out["RESULTS.md"].read_text()
    assert out["roofline.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- profiling

def test_fastarch_ops_run_inside_named_ranges(device):
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        FF.max_pool2d(x, 2).sum().backward()
    names = {event.name for event in prof.events()}
    assert {"fastarch::max_pool2d", "fastarch::max_pool2d.backward"} <= names


@pytest.mark.gpu_check
def test_profile_command_prints_its_table_and_writes_a_trace(tmp_path, capsys):
    """In this process (``python -m fastarch profile``, which restarts itself under the
    interpreter, runs in the GPU check's dry run, tests/test_gpu_check.py)."""
    trace = tmp_path / "trace.json"
    assert profiler.main(["lenet5", "--batch", "2", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastarch profile: lenet5, batch 2, bf16")
    assert "4 fused runs" in lines[0]
    rules = [index for index, line in enumerate(lines) if line.startswith("---")]
    units = [line.split()[0] for line in lines[rules[0] + 1:rules[1]]]
    # LeNet-5 is built fused: each conv and fc1, fc2 with the ReLU after it is one unit.
    assert units == ["conv1-relu1", "pool1", "conv2-relu2", "pool2", "fc1-relu3", "fc2-relu4",
                     "fc3"]
    conv1 = next(line for line in lines if line.startswith("conv1-relu1 "))
    # The kernels column: device kernels on a GPU, the fastarch op ranges under the interpreter.
    conv_kernel = "conv2d_forward_kernel" if torch.cuda.is_available() else "fastarch::conv2d"
    assert "conv 1->6 5x5 + relu" in conv1 and "2x1x32x32" in conv1 and conv_kernel in conv1
    assert any(line.startswith("whole model forward") for line in lines)
    names = {event["name"] for event in json.loads(trace.read_text())["traceEvents"]}
    # Modules outside a fused run get a range each (a hook on a run's module would unfuse it).
    assert {"LeNet5", "pool1 avg 2x2 s2", "fc3 fc 84->10", "fastarch::conv2d",
            "fastarch::linear"} <= names
    assert "conv1 conv 1->6 5x5" not in names
