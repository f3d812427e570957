"""The bytes ledger (``python -m fastarch ledger``): eager's per-layer kernel sequence against
hand counts on one small conv -> bn -> relu -> pool block, fastarch's launches against those
a real step launches, the read / written reading of the kernels' sources, and the command."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fastarch.nn as fnn
from fastarch import fusion, ledger
from fastarch.compile_report.launches import all_launches
from fastarch.kernels import launch as launch_module

BF16, FP32, INT64 = 2, 4, 8
N, C_IN, C, H = 2, 16, 8, 8            # conv 16 -> 8, 3x3 p1, on 2 x 16 x 8 x 8
X, W, Y, P = N * C_IN * H * H, C * C_IN * 9, N * C * H * H, N * C * (H // 2) ** 2


def block() -> nn.Sequential:
    """conv -> bn -> relu -> max pool (fused by fastarch), then a classifier for the loss."""
    return fusion.fuse(nn.Sequential(
        fnn.Conv2d(C_IN, C, 3, padding=1), fnn.BatchNorm2d(C), fnn.ReLU(inplace=True),
        fnn.MaxPool2d(2), nn.Flatten(), fnn.Linear(C * (H // 2) ** 2, 10)))


def meta_ledger(train: bool) -> ledger.Ledger:
    model = block().to(device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.empty(N, C_IN, H, H, dtype=torch.bfloat16, device="meta",
                    memory_format=torch.channels_last)
    return ledger.measure_module(model, x, train)


def rows_of(rows: list[ledger.Row], block: str) -> list[tuple[str, str, int, int]]:
    return [(row.kernel, row.phase, row.read, row.written) for row in rows
            if row.block == block]


def test_eager_eval_sequence_matches_hand_counts():
    eager = rows_of(meta_ledger(train=False).eager, "0-4")
    assert eager == [
        ("cudnn conv fprop", "forward", (X + W) * BF16, Y * BF16),
        ("conv bias add_", "forward", Y * BF16 + C * BF16, Y * BF16),
        # x, weight, bias, running mean and var in; y out
        ("bn apply (eval)", "forward", Y * BF16 + 4 * C * BF16, Y * BF16),
        ("aten::relu_", "forward", Y * BF16, Y * BF16),
        ("aten::max_pool2d_with_indices", "forward", Y * BF16, P * BF16 + P * INT64),
        ("aten::clone", "forward", P * BF16, P * BF16),  # flatten of a channels_last tensor
    ]


def test_eager_training_step_matches_hand_counts():
    """Forward (batch statistics, running-statistics update), backward (no input gradient:
    the image needs none) and the optimizer: momentum buffer, gradient and parameter."""
    step = meta_ledger(train=True)
    stats = 2 * C * FP32  # mean and inverse std, fp32
    assert rows_of(step.eager, "0-4") == [
        ("cudnn conv fprop", "forward", (X + W) * BF16, Y * BF16),
        ("conv bias add_", "forward", (Y + C) * BF16, Y * BF16),
        ("aten::add_", "forward", INT64, INT64),  # num_batches_tracked
        ("bn stats", "forward", Y * BF16, stats),
        ("bn running-stats update", "forward", stats + 2 * C * BF16, 2 * C * BF16),
        ("bn apply", "forward", (Y + 2 * C) * BF16 + stats, Y * BF16),
        ("aten::relu_", "forward", Y * BF16, Y * BF16),
        ("aten::max_pool2d_with_indices", "forward", Y * BF16, P * (BF16 + INT64)),
        ("aten::clone", "forward", P * BF16, P * BF16),
        ("aten::max_pool2d_with_indices_backward", "backward", P * (BF16 + INT64), Y * BF16),
        ("aten::threshold_backward", "backward", 2 * Y * BF16, Y * BF16),
        ("bn backward reduce", "backward", 2 * Y * BF16 + stats, 2 * stats + 2 * C * BF16),
        ("bn backward elemt", "backward", (2 * Y + C) * BF16 + 3 * stats, Y * BF16),
        ("cudnn conv wgrad", "backward", (X + Y) * BF16, W * BF16),
        ("conv bias grad (reduce)", "backward", Y * BF16, C * BF16),
    ]
    parameters = sum(p.numel() for p in block().parameters()) * BF16
    for side in (step.eager, step.fastarch):  # momentum: buf *= m; buf += g; param -= lr*buf
        assert sum(row.bytes for row in side if row.phase == "optimizer") == 8 * parameters


def test_fastarch_eval_launches_match_hand_counts():
    """The BatchNorm folds into the conv epilogue (fp32 scale and shift, no bias); the pool
    reads the conv's output; nothing else but C-sized torch ops (the fold) runs."""
    rows = meta_ledger(train=False).fastarch
    launches = [row for row in rows if not row.kernel.startswith("aten::")]
    conv, pool, *classifier = launches
    assert conv.kernel.startswith("conv2d_forward[") and conv.module == "0"
    assert (conv.read, conv.written) == ((X + W) * BF16 + 2 * C * FP32, Y * BF16)
    assert pool.kernel.startswith("max_pool2d_forward[")
    assert (pool.read, pool.written) == (Y * BF16, P * BF16)
    assert all(row.module == "5" for row in classifier)
    folds = [row for row in rows if row.kernel.startswith("aten::") and row.block == "0-4"]
    assert folds and all(row.bytes <= 4 * C * FP32 for row in folds if row.kernel != "aten::clone")


def test_fastarch_launches_are_those_a_real_step_runs(device, monkeypatch):
    """The meta run builds exactly the launches (kernel and config) that the same forward and
    backward launch on real tensors, in the same order."""
    torch.manual_seed(0)
    model = block().to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    meta_model = copy.deepcopy(model).to("meta")
    x = torch.randn(N, C_IN, H, H, device=device, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    launched: list[str] = []
    call = launch_module.Launch.__call__

    def recording(self) -> None:
        launched.append(self.name)
        call(self)
    with monkeypatch.context() as patch:
        patch.setattr(launch_module.Launch, "__call__", recording)
        F.cross_entropy(model(x), torch.zeros(N, dtype=torch.long, device=device)).backward()
    step = ledger.measure_module(meta_model, x.to("meta"), train=True)
    recorded = [row.kernel for row in step.fastarch if not row.kernel.startswith("aten::")]
    assert recorded == launched


def test_weight_gradients_need_no_layout_copy():
    """A conv's weight gradient comes out in its channels_last weight's layout, as cuDNN's:
    autograd accumulates it without a copy (no aten::copy_ in the backward, either side)."""
    step = meta_ledger(train=True)
    for side in (step.fastarch, step.eager):
        backward = [row.kernel for row in side if row.phase == "backward"]
        assert backward and not any(kernel.startswith("aten::copy_") for kernel in backward)


def test_every_shipped_kernel_argument_is_read_or_written():
    """Every tensor argument of every config the compile report builds is loaded or stored
    in its kernel's source (``launch_bytes`` refuses one that is neither); every kernel
    writes, and all but the zero fill read."""
    for launch in all_launches():
        read, written = ledger.launch_bytes(launch)
        assert written > 0 and (read > 0) != launch.name.startswith("conv2d_zero_fill"), \
            launch.name


def test_roles_are_read_from_helpers_and_descriptors():
    from fastarch.kernels import batch_norm, conv2d_tma, max_pool, nhwc, relu
    assert ledger.pointer_roles(relu.relu_forward_kernel.fn)["y_ptr"] == {"store"}
    assert ledger.pointer_roles(relu.relu_backward_kernel.fn)["y_ptr"] == {"load"}
    finalize = ledger.pointer_roles(batch_norm.batch_norm_finalize_kernel.fn)
    assert finalize["running_mean_ptr"] == {"load", "store"}
    assert finalize["save_mean_ptr"] == {"store"}
    assert ledger.pointer_roles(nhwc.store_tile.fn)["ptr"] == {"store"}  # a helper's store
    tma = ledger.pointer_roles(conv2d_tma.conv2d_forward_tma_kernel.fn)
    assert tma["x_ptr"] == {"load"} and tma["y_ptr"] == {"store"}
    # pixel coordinates from a helper that takes pointers are no pointers themselves
    pool = ledger.pointer_roles(max_pool.max_pool2d_backward_kernel.fn)
    assert {name: pool[name] for name in ("dy_ptr", "offset_ptr", "x_ptr", "dx_ptr")} == {
        "dy_ptr": {"load"}, "offset_ptr": {"load"}, "x_ptr": {"load"}, "dx_ptr": {"store"}}


def test_the_command_writes_the_totals_and_rows(tmp_path):
    path = tmp_path / "ledger.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastarch", "ledger", "lenet5", "--batch", "2",
                           "--train", "--json", str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fastarch / eager" in done.stdout and "| conv1-pool1 |" in done.stdout
    report = json.loads(path.read_text())
    for side in ("fastarch", "eager"):
        rows = report[f"{side}_rows"]
        assert report[f"{side}_bytes"] == sum(r["read"] + r["written"] for r in rows) > 0
        assert {"kernel", "module", "read", "written"} <= set(rows[0])
        assert {r["phase"] for r in rows} == set(ledger.PHASES)
    assert math.isclose(report["ratio"], report["fastarch_bytes"] / report["eager_bytes"])
