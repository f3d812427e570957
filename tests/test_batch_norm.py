"""BatchNorm2d (alone, + ReLU, + ReLU + pool) and ReLU against float64 torch, in the
interpreter: outputs, input and parameter gradients, running statistics and
num_batches_tracked, stepped in lockstep with torch.nn over several batches."""

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend
from fastarch.kernels.batch_norm import BatchNormStatistics
from fastarch.ops import batch_norm as bn_ops
from fastarch.testing import assert_close, random_input
from layout_paths import PATH_CASES, assert_paths, path_input, recorded_launches

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": False, "nhwc": True}

# Input shapes: several reduction tiles and merge steps, odd channel counts (RGB, 5, 17),
# one image with spatial extent, and channels wider than one 64-channel vector.
SHAPES = {
    "multi_tile": (4, 6, 10, 10),
    "rgb_3": (2, 3, 7, 5),
    "odd_5": (3, 5, 4, 4),
    "odd_17": (2, 17, 5, 3),
    "batch_1": (1, 8, 5, 6),
    "wide_70": (2, 70, 3, 3),
}
# Every shape in both layouts, the dtype alternating with both: the kernels only load and
# store it (their sums and statistics are fp32), so each shape and each layout meets fp32 and
# bf16 at half the product's cost; and fp16 on the multi-tile shape.
LOCKSTEP_CASES = {f"{shape}-{dtype}-{layout}": (SHAPES[shape], DTYPES[dtype], LAYOUTS[layout])
                  for i, shape in enumerate(SHAPES) for j, layout in enumerate(LAYOUTS)
                  for dtype in [("fp32", "bf16")[(i + j) % 2]]}
LOCKSTEP_CASES.update({f"multi_tile-fp16-{layout}": (SHAPES["multi_tile"], torch.float16,
                                                     LAYOUTS[layout]) for layout in LAYOUTS})


def _pixels(shape: tuple[int, ...]) -> int:
    return shape[0] * shape[2] * shape[3]


def _module_pair(channels: int, device: str, **kwargs):
    """fastarch's BatchNorm2d and a float64 torch.nn twin with the same random affine
    parameters (not the 1/0 defaults, so a swapped gamma/beta shows)."""
    ours = fastarch.nn.BatchNorm2d(channels, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.copy_(torch.randn(channels))
            ours.bias.copy_(torch.randn(channels))
    reference = torch.nn.BatchNorm2d(channels, **kwargs).double()
    reference.load_state_dict(ours.state_dict())
    return ours.to(device), reference


def _step_and_compare(ours, reference, shape, dtype, channels_last, device, step_name):
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    y = ours(x)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)
    x_ref = x.detach().cpu().double().requires_grad_(True)
    y_ref = reference(x_ref)
    y_ref.backward(dy.cpu().double())
    n = _pixels(shape)
    assert_close(y, y_ref, dtype, n, name=f"{step_name} output")
    assert_close(x.grad, x_ref.grad, dtype, n, name=f"{step_name} grad input")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    if ours.affine:
        # fp32 sums of exactly representable products: fp32 accuracy whatever the input dtype.
        assert_close(ours.weight.grad, reference.weight.grad, torch.float32, n,
                     name=f"{step_name} grad weight")
        assert_close(ours.bias.grad, reference.bias.grad, torch.float32, n,
                     name=f"{step_name} grad bias")
        ours.zero_grad()
        reference.zero_grad()
    _compare_buffers(ours, reference, n, step_name)


def _compare_buffers(ours, reference, n, step_name):
    if reference.running_mean is None:
        assert ours.running_mean is None and ours.running_var is None
        assert ours.num_batches_tracked is None
        return
    assert_close(ours.running_mean, reference.running_mean, torch.float32, n,
                 name=f"{step_name} running_mean")
    assert_close(ours.running_var, reference.running_var, torch.float32, n,
                 name=f"{step_name} running_var")
    assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item()


def _lockstep(ours, reference, shape, dtype, channels_last, device, train_steps=3):
    for step in range(train_steps):
        _step_and_compare(ours, reference, shape, dtype, channels_last, device, f"train {step}")
    ours.eval()
    reference.eval()
    _step_and_compare(ours, reference, shape, dtype, channels_last, device, "eval")


@pytest.mark.gpu_check
@pytest.mark.parametrize("case", LOCKSTEP_CASES.values(), ids=LOCKSTEP_CASES.keys())
def test_module_steps_in_lockstep_with_torch(case, device):
    shape, dtype, channels_last = case
    ours, reference = _module_pair(shape[1], device)
    _lockstep(ours, reference, shape, dtype, channels_last, device)
    assert ours.num_batches_tracked.item() == 3


MODULE_VARIANTS = {
    "momentum_none": dict(momentum=None),
    "affine_false": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
    "no_running_stats_affine_false": dict(track_running_stats=False, affine=False),
    "momentum_0.3_eps_1e-3": dict(momentum=0.3, eps=1e-3),
}


@pytest.mark.parametrize("kwargs", MODULE_VARIANTS.values(), ids=MODULE_VARIANTS.keys())
def test_module_variants_step_in_lockstep(kwargs, device):
    shape = SHAPES["multi_tile"]
    ours, reference = _module_pair(shape[1], device, **kwargs)
    _lockstep(ours, reference, shape, torch.float32, True, device)


@pytest.mark.gpu_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_relu_matches_torch(training, channels_last, dtype, device):
    shape = SHAPES["odd_17"]
    C, n = shape[1], _pixels(shape)
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    weight = torch.randn(C, device=device, requires_grad=True)
    bias = torch.randn(C, device=device, requires_grad=True)
    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    ref_mean, ref_var = running_mean.cpu().double(), running_var.cpu().double()
    y = fastarch.functional.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                            training, 0.2, 1e-4)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)

    def reference(x64, w64, b64):
        return F.relu(F.batch_norm(x64, ref_mean, ref_var, w64, b64, training, 0.2, 1e-4))
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, weight, bias)]
    y_ref = reference(*leaves)
    y_ref.backward(dy.cpu().double())
    assert (y_ref == 0).any() and (y_ref > 0).any(), "the ReLU must cut something"
    assert_close(y, y_ref, dtype, n, name="output")
    assert_close(x.grad, leaves[0].grad, dtype, n, name="grad input")
    assert_close(weight.grad, leaves[1].grad, torch.float32, n, name="grad weight")
    assert_close(bias.grad, leaves[2].grad, torch.float32, n, name="grad bias")
    assert_close(running_mean, ref_mean, torch.float32, n, name="running_mean")
    assert_close(running_var, ref_var, torch.float32, n, name="running_var")


# (pool, torch.nn.functional keyword arguments)
POOL_CASES = {
    "max_2x2_s2": ("max", dict(kernel_size=2, stride=2)),
    "max_3x3_s2_pad1_ceil": ("max", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "avg_2x2_s2": ("avg", dict(kernel_size=2, stride=2)),
    "avg_3x3_s2_pad1_exclude": ("avg", dict(kernel_size=3, stride=2, padding=1,
                                            count_include_pad=False)),
}


# Every pool in both modes, layouts and ReLU flags, the dtype (only loaded and stored)
# alternating with the layout and the flag, so that each dtype meets each of them.
POOL_VARIANTS = {
    f"{case}-{mode}-{layout}-{dtype}-{relu}": (POOL_CASES[case], mode == "train",
                                               LAYOUTS[layout], DTYPES[dtype], relu == "relu")
    for case in POOL_CASES for mode in ("train", "eval") for j, layout in enumerate(LAYOUTS)
    for k, relu in enumerate(("relu", "no_relu")) for dtype in [("fp32", "bf16")[(j + k) % 2]]}


@pytest.mark.gpu_check
@pytest.mark.parametrize("case, training, channels_last, dtype, relu", POOL_VARIANTS.values(),
                         ids=POOL_VARIANTS.keys())
def test_batch_norm_fused_into_pool_matches_torch(case, training, channels_last, dtype, relu,
                                                   device):
    kind, pool_kwargs = case
    shape = (2, 5, 9, 8)
    C, n = shape[1], _pixels(shape)
    x = random_input(shape, dtype, device, channels_last, requires_grad=True)
    # Negative gammas: the max of the normalised window is not the normalised max.
    weight = torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0], device=device, requires_grad=True)
    bias = torch.randn(C, device=device, requires_grad=True)
    running_mean, running_var = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    ref_mean, ref_var = running_mean.cpu().double(), running_var.cpu().double()
    fused = (fastarch.functional.batch_norm_max_pool2d if kind == "max"
             else fastarch.functional.batch_norm_avg_pool2d)
    torch_pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    y = fused(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, relu=relu,
              **pool_kwargs)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)

    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, weight, bias)]
    z = F.batch_norm(leaves[0], ref_mean, ref_var, leaves[1], leaves[2], training, 0.1, 1e-5)
    y_ref = torch_pool(F.relu(z) if relu else z, **pool_kwargs)
    y_ref.backward(dy.cpu().double())
    assert_close(y, y_ref, dtype, n, name="output")
    assert_close(x.grad, leaves[0].grad, dtype, n, name="grad input")
    # The pool's backward hands BatchNorm its gradient in the input dtype (as torch's does),
    # so overlapping windows round their sums: gamma/beta grads are as exact as that.
    grad_rtol = torch.float32 if dtype == torch.float32 else dtype
    assert_close(weight.grad.to(dtype), leaves[1].grad, grad_rtol, n, name="grad weight")
    assert_close(bias.grad.to(dtype), leaves[2].grad, grad_rtol, n, name="grad bias")
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    assert_close(running_mean, ref_mean, torch.float32, n, name="running_mean")
    assert_close(running_var, ref_var, torch.float32, n, name="running_var")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_constant_channel_has_zero_variance(device):
    ours, reference = _module_pair(4, device, momentum=0.5)
    x = random_input((3, 4, 5, 5), torch.float32, device)
    x[:, 2] = 3.25  # exactly representable: the batch variance is exactly 0
    x.requires_grad_(True)
    y = ours(x)
    dy = random_input(y.shape, torch.float32, device)
    y.backward(dy)
    x_ref = x.detach().cpu().double().requires_grad_(True)
    y_ref = reference(x_ref)
    y_ref.backward(dy.cpu().double())
    assert torch.equal(y[:, 2].cpu(), torch.full_like(y[:, 2].cpu(), ours.bias[2].item()))
    assert ours.running_var[2].item() == 0.5 * 1.0  # (1 - momentum) * 1 + momentum * 0
    assert_close(y, y_ref, torch.float32, 75, name="output")
    assert_close(x.grad, x_ref.grad, torch.float32, 75, name="grad input")
    _compare_buffers(ours, reference, 75, "constant channel")


@pytest.mark.gpu_check
def test_large_mean_small_spread_keeps_variance_accurate(device):
    """mean 1e4, std 1: in fp32, E[x^2] - E[x]^2 cancels about 8 of its 7 significant digits."""
    x = (1e4 + random_input((8, 3, 16, 16), torch.float32, device)).requires_grad_(True)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastarch.functional.batch_norm(x, running_mean, running_var, training=True,
                                       momentum=1.0)
    x64 = x.detach().cpu().double()
    var64 = x64.var(dim=(0, 2, 3), unbiased=True)
    x32 = x.detach().cpu()
    naive = ((x32 * x32).mean((0, 2, 3)) - x32.mean((0, 2, 3)) ** 2) * (2048 / 2047)
    assert ((naive - var64).abs() / var64).max() > 1e-2, "the naive formula should fail here"
    assert ((running_var.cpu().double() - var64).abs() / var64).max() < 1e-3
    assert ((running_mean.cpu().double() - x64.mean((0, 2, 3))).abs() / 1e4).max() < 1e-6
    # The fp32 mean itself is off by up to an ulp of 1e4 (9.8e-4; rounded twice, as a tile's
    # mean and merged): that bounds y's error. tests/test_welford.py tries the GPU's tiles too.
    y_ref = F.batch_norm(x64, None, None, training=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.detach().cpu().double(), y_ref, rtol=1e-5, atol=1.25 * 2**-10)


def test_bf16_input_keeps_fp32_statistics(device):
    x = random_input((2, 6, 5, 5), torch.bfloat16, device, channels_last=True)
    count, mean, m2 = bn_ops.batch_norm_welford_partials(x).unbind(0)
    running_mean, running_var = torch.zeros(6, device=device), torch.ones(6, device=device)
    stats = BatchNormStatistics(*bn_ops.batch_norm_finalize(count, mean, m2, None, None,
                                                            running_mean, running_var, 0.1,
                                                            1e-5))
    assert {t.dtype for t in (count, mean, m2, *stats)} == {torch.float32}
    x64 = x.cpu().double()
    assert_close(stats.mean, x64.mean((0, 2, 3)), torch.float32, 50, name="mean")
    invstd64 = (x64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    assert_close(stats.invstd, invstd64, torch.float32, 50, name="invstd")
    module = fastarch.nn.BatchNorm2d(6).to(device)
    y = module(x.requires_grad_(True))
    saved_mean, saved_invstd = y.grad_fn.saved_tensors[1:3]
    assert y.dtype == torch.bfloat16
    assert saved_mean.dtype == saved_invstd.dtype == torch.float32
    assert module.running_mean.dtype == module.running_var.dtype == torch.float32


def test_finalize_merges_uneven_partials_like_a_conv_epilogue(device):
    """The finalize takes any [tiles, C] (count, mean, M2) partials: here tiles of uneven size
    cut by hand, as the conv epilogue's last M tile is."""
    values = random_input((50, 7), torch.float32, device) * 3 + 2
    bounds = [0, 16, 32, 48, 50]
    chunks = [values[a:b].double() for a, b in zip(bounds, bounds[1:])]
    partials = torch.stack([torch.stack([torch.full((7,), float(len(c)), dtype=torch.float64)
                                         for c in chunks]),
                            torch.stack([c.mean(0) for c in chunks]),
                            torch.stack([((c - c.mean(0)) ** 2).sum(0) for c in chunks])])
    partials = partials.float().to(device)
    weight, bias = torch.randn(7, device=device), torch.randn(7, device=device)
    running_mean, running_var = torch.randn(7, device=device), torch.rand(7, device=device) + 1
    expected_mean = 0.9 * running_mean.cpu().double() + 0.1 * values.cpu().double().mean(0)
    expected_var = 0.9 * running_var.cpu().double() + 0.1 * values.cpu().double().var(0)
    stats = BatchNormStatistics(*bn_ops.batch_norm_finalize(*partials, weight, bias,
                                                            running_mean, running_var, 0.1,
                                                            1e-5))
    invstd = (values.cpu().double().var(0, unbiased=False) + 1e-5).rsqrt()
    assert_close(stats.mean, values.cpu().double().mean(0), torch.float32, 50, name="mean")
    assert_close(stats.invstd, invstd, torch.float32, 50, name="invstd")
    assert_close(stats.scale, invstd * weight.cpu().double(), torch.float32, 50, name="scale")
    assert torch.equal(stats.shift, bias)
    assert_close(running_mean, expected_mean, torch.float32, 50, name="running_mean")
    assert_close(running_var, expected_var, torch.float32, 50, name="running_var")


def test_functional_takes_2d_3d_and_strided_inputs(device):
    for shape in ((6, 4), (3, 4, 5)):
        x = random_input(shape, torch.float32, device)
        y = fastarch.functional.batch_norm(x, None, None, training=True)
        assert_close(y, F.batch_norm(x.cpu().double(), None, None, training=True),
                     torch.float32, x.numel() // 4, name=f"{len(shape)}-d output")
    base = random_input((4, 9, 7, 6), torch.float32, device)
    x = base[::2, 1::2, :, 1:]  # no dense layout
    y = fastarch.functional.batch_norm(x, None, None, training=True)
    assert_close(y, F.batch_norm(x.cpu().double(), None, None, training=True), torch.float32,
                 70, name="strided output")


def test_training_is_bitwise_deterministic(device):
    shape = SHAPES["multi_tile"]
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        module = fastarch.nn.BatchNorm2d(shape[1]).to(device)
        x = random_input(shape, torch.bfloat16, device, channels_last=True, requires_grad=True)
        y = fastarch.nn.ReLU()(module(x))
        y.backward(random_input(y.shape, torch.bfloat16, device))
        results.append([t.detach().clone() for t in (y, x.grad, module.weight.grad,
                                                      module.bias.grad, module.running_mean,
                                                      module.running_var)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_module_looks_like_torch_nn(device):
    for kwargs in ({}, dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                   dict(eps=1e-3, momentum=0.01)):
        ours, theirs = fastarch.nn.BatchNorm2d(5, **kwargs), torch.nn.BatchNorm2d(5, **kwargs)
        assert isinstance(ours, torch.nn.BatchNorm2d)
        assert ours.extra_repr() == theirs.extra_repr()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
    assert repr(fastarch.nn.ReLU(inplace=True)) == repr(torch.nn.ReLU(inplace=True))
    assert isinstance(fastarch.nn.ReLU(), torch.nn.ReLU)


# (input shape, fastarch call given the input, the torch.nn twin of that call)
BAD_INPUTS = {
    "module_3d": ((2, 3, 4), lambda m, x: m(x), "expected 4D input"),
    "module_channels": ((2, 5, 4, 4), lambda m, x: m(x), "should contain 5 elements"),
    "one_value_per_channel": ((1, 3, 1, 1), lambda m, x: m(x), "more than 1 value"),
    "integer_input": ((2, 3, 4, 4), lambda m, x: m(x.to(torch.int32)), "not implemented"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_module_input_raises_torchs_error_type(case, device):
    shape, call, message = case
    x = random_input(shape, torch.float32, device)
    with pytest.raises(Exception) as theirs:
        call(torch.nn.BatchNorm2d(3), x.cpu())
    with pytest.raises(theirs.type, match=message):
        call(fastarch.nn.BatchNorm2d(3).to(device), x)


BAD_FUNCTIONAL_ARGS = {
    "eval_without_running_stats": (dict(running_mean=None, running_var=None, training=False),
                                   "must be defined in evaluation mode"),
    "one_running_stat": (dict(running_mean=None, training=True), "both be None"),
    "weight_size": (dict(weight=torch.ones(5)), "weight should contain 3 elements"),
    "bias_size": (dict(bias=torch.ones(2)), "bias should contain 3 elements"),
    "running_var_size": (dict(running_var=torch.ones(4)), "running_var should contain 3"),
}


@pytest.mark.parametrize("case", BAD_FUNCTIONAL_ARGS.values(), ids=BAD_FUNCTIONAL_ARGS.keys())
def test_bad_functional_args_raise_torchs_error_type(case, device):
    overrides, message = case
    kwargs = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), training=True)
    kwargs.update(overrides)
    x = random_input((2, 3, 4, 4), torch.float32, device)
    with pytest.raises(Exception) as theirs:
        F.batch_norm(x.cpu(), **kwargs)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(theirs.type, match=message):
        fastarch.functional.batch_norm(x, **on_device)


def test_bad_fused_pool_args_raise(device):
    stats = dict(running_mean=None, running_var=None, training=True)
    with pytest.raises(RuntimeError, match="4D"):
        fastarch.functional.batch_norm_max_pool2d(random_input((3, 4, 4), torch.float32, device),
                                                  kernel_size=2, **stats)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        fastarch.functional.batch_norm_avg_pool2d(
            random_input((2, 3, 4, 4), torch.float32, device), kernel_size=2, padding=2,
            **stats)


@pytest.mark.torch_fallback
def test_float64_and_empty_inputs_run_torch(device):
    before = backend.fallback_counts["batch_norm"]
    x = random_input((2, 3, 4, 4), torch.float64, device)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64,
                                                                            device=device)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    y = fastarch.functional.batch_norm(x, rm, rv, training=True)
    assert torch.equal(y, F.batch_norm(x, ref_rm, ref_rv, training=True))
    assert torch.equal(rm, ref_rm) and torch.equal(rv, ref_rv)
    empty = random_input((0, 3, 4, 4), torch.float32, device)
    assert fastarch.functional.batch_norm(empty, None, None, training=True).shape == empty.shape
    assert backend.fallback_counts["batch_norm"] == before + 2


# ----------------------------------------------------------------------------- relu

@pytest.mark.gpu_check
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("channels_last", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_relu_module_matches_torch(inplace, channels_last, dtype, device):
    x = random_input((2, 5, 4, 3), dtype, device, channels_last)
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 0, 1] = 0.0
    leaf = x.clone().requires_grad_(True)
    source = leaf * 1  # an in-place op needs a non-leaf
    y = fastarch.nn.ReLU(inplace=inplace)(source)
    dy = random_input(y.shape, dtype, device)
    y.backward(dy)
    ref_leaf = x.cpu().double().requires_grad_(True)
    y_ref = torch.relu(ref_leaf)
    y_ref.backward(dy.cpu().double())
    assert (y is source) == inplace
    # ReLU and its gradient are exact; NaN stays NaN and passes its gradient, as in torch.
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_leaf.grad, rtol=0, atol=0)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_relu_on_other_shapes_and_layouts(device):
    flat = random_input((37,), torch.float32, device)
    assert torch.equal(fastarch.functional.relu(flat).cpu(), torch.relu(flat.cpu()))
    transposed = random_input((6, 9), torch.float32, device).t()
    assert torch.equal(fastarch.functional.relu(transposed).cpu(), torch.relu(transposed.cpu()))
    fastarch.functional.relu(transposed, inplace=True)
    assert (transposed >= 0).all()


def test_relu_inplace_on_a_leaf_that_requires_grad_raises(device):
    x = random_input((2, 3), torch.float32, device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fastarch.functional.relu(x, inplace=True)


@pytest.mark.parametrize("channels, layout", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_dense_and_strided_paths_match_torch(channels, layout, device):
    """Statistics, BatchNorm + ReLU and BatchNorm fused into a max pool, forward and backward,
    on each addressing path of their kernels."""
    x = path_input((2, channels, 3, 4), layout, device, requires_grad=True)
    weight = torch.randn(channels, device=device, requires_grad=True)
    bias = torch.randn(channels, device=device, requires_grad=True)
    with recorded_launches() as launches:
        y = fastarch.functional.batch_norm_relu(x, None, None, weight, bias, training=True)
        z = fastarch.functional.batch_norm_max_pool2d(x, None, None, weight, bias, training=True,
                                                      kernel_size=2)
        dy, dz = path_input(y.shape, layout, device), path_input(z.shape, layout, device)
        torch.autograd.backward([y, z], [dy, dz])
    assert_paths(launches, channels, layout)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, weight, bias)]
    y_ref = F.relu(F.batch_norm(leaves[0], None, None, *leaves[1:], training=True))
    z_ref = F.max_pool2d(y_ref, 2)
    torch.autograd.backward([y_ref, z_ref], [dy.cpu().double(), dz.cpu().double()])
    n = _pixels(x.shape)
    assert_close(y, y_ref, torch.float32, n, name="output")
    assert_close(z, z_ref, torch.float32, n, name="pooled output")
    for name, ours, reference in zip(("input", "weight", "bias"), (x, weight, bias), leaves):
        assert_close(ours.grad, reference.grad, torch.float32, n, name=f"grad {name}")
