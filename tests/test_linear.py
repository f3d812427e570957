"""Linear (GEMM with bias, ReLU and dropout in its epilogue), dropout, their operators'
gradients and fastarch.nn.Linear / Dropout, against float64 torch in the interpreter.

The dropout mask of a fused call is recovered from our own output: the mask depends only on
the seed (drawn from torch's generator) and the element's position, so the same call on
all-positive operands after the same ``torch.manual_seed`` is nonzero exactly where kept."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch import backend, functional
from fastarch.kernels import dropout as dropout_kernels
from fastarch.kernels import linear as linear_kernels
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import dropout as dropout_ops
from fastarch.ops import linear as linear_ops
from fastarch.testing import assert_close, assert_same_outcome, random_input, reference_grads
from variants import alternating

# name -> (input shape, out features): the real classifier layers, AlexNet/VGG's shrunk.
LINEAR_CASES = {
    "lenet_fc1_400to120": ((6, 400), 120),        # K = 400: the interpreter splits K in two
    "lenet_fc2_120to84": ((6, 120), 84),
    "lenet_fc3_84to10": ((6, 84), 10),
    "alexnet_fc6_shrunk_576to96": ((4, 576), 96),
    "vgg_fc7_shrunk_96to96": ((4, 96), 96),
    "head_64to1000": ((3, 64), 1000),             # 1000 classes: eight column tiles
    "two_row_tiles_80_rows": ((80, 40), 24),
    "weight_grad_split_k_520_rows": ((520, 16), 12),  # dW reduces 520 rows in two splits
    "3d_input": ((2, 3, 40), 24),
}

# id -> (dtype, torch.backends.cuda.matmul.allow_tf32, tolerance key)
DTYPES = {
    "fp32": (torch.float32, False, torch.float32),
    "tf32": (torch.float32, True, "tf32"),
    "fp16": (torch.float16, False, torch.float16),
    "bf16": (torch.bfloat16, False, torch.bfloat16),
}


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _operands(shape, out_features, dtype, device, bias=True, requires_grad=True):
    x = random_input(shape, dtype, device, requires_grad=requires_grad)
    weight = random_input((out_features, shape[-1]), dtype, device, requires_grad=requires_grad)
    b = random_input((out_features,), dtype, device, requires_grad=requires_grad) \
        if bias else None
    return x, weight, b


def _check_grads(actual, reference, dtype, shape, out_features, names):
    rows = math.prod(shape[:-1])
    lengths = {"input": out_features, "weight": rows, "bias": rows}
    for grad, ref, name in zip(actual, reference, names):
        assert_close(grad, ref, dtype, lengths[name], name=f"grad {name}")


# ----------------------------------------------------------------------------- linear

# Every case in every dtype, with and without a bias by turns (an add in the epilogue and a
# column sum, the same in every dtype): each case and each dtype meets both.
@pytest.mark.gpu_check
@pytest.mark.parametrize("case_id, dtype_id, bias_id",
                         alternating(LINEAR_CASES, DTYPES, ["bias", "no_bias"]))
def test_linear_values_and_grads(case_id, dtype_id, bias_id, device):
    bias = bias_id == "bias"
    shape, out_features = LINEAR_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    x, weight, b = _operands(shape, out_features, dtype, device, bias)
    with matmul_tf32(tf32):
        y = functional.linear(x, weight, b)
        dy = random_input(y.shape, dtype, device)
        y.backward(dy)
    leaves = [t for t in (x, weight, b) if t is not None]
    y_ref, grads_ref = reference_grads(F.linear, leaves, dy)
    assert_close(y, y_ref, tolerance, shape[-1])
    _check_grads([t.grad for t in leaves], grads_ref, tolerance, shape, out_features,
                 ["input", "weight", "bias"])


def test_non_contiguous_inputs(device):
    """A column slice and a transpose run through their strides (the weight gradient too);
    a 3-D transpose is flattened with one copy."""
    for x in (random_input((7, 80), torch.float32, device)[:, ::2],
              random_input((40, 7), torch.float32, device).t(),
              random_input((2, 40, 3), torch.float32, device).transpose(1, 2)):
        weight = random_input((24, 40), torch.float32, device, requires_grad=True)
        with matmul_tf32(False):
            y = functional.linear(x, weight)
            dy = random_input(y.shape, torch.float32, device)
            y.backward(dy)
        y_ref, (weight_grad_ref,) = reference_grads(lambda w: F.linear(x.double(), w),
                                                    [weight], dy)
        assert_close(y, y_ref, torch.float32, 40)
        assert_close(weight.grad, weight_grad_ref, torch.float32, x.shape[:-1].numel())


def test_1d_input_and_zero_features(device):
    x, weight, b = _operands((40,), 24, torch.float32, device, requires_grad=False)
    with matmul_tf32(False):
        y = functional.linear(x, weight, b)
        no_features = functional.linear(x[:0], weight[:, :0], b)
    assert_close(y, F.linear(x.double(), weight.double(), b.double()), torch.float32, 40)
    assert torch.equal(no_features, b)


def test_expanded_output_grad(device):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    x, weight, b = _operands((5, 32), 20, torch.float32, device)
    with matmul_tf32(False):
        functional.linear(x, weight, b).sum().backward()
    _, grads_ref = reference_grads(lambda *t: F.linear(*t).sum(), [x, weight, b],
                                   torch.tensor(1.0))
    _check_grads([x.grad, weight.grad, b.grad], grads_ref, torch.float32, (5, 32), 20,
                 ["input", "weight", "bias"])


def test_empty_batch(device):
    x, weight, b = _operands((0, 16), 8, torch.float32, device)
    y = functional.linear(x, weight, b)
    y.sum().backward()
    assert y.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_autocast_casts_like_torch(device):
    x, weight, b = _operands((4, 32), 16, torch.float32, device, requires_grad=False)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = functional.linear(x, weight, b)
        expected = F.linear(x, weight, b)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert_close(y, expected.double(), torch.bfloat16, 32)


# ----------------------------------------------------------------------------- fused block

def _recover_mask(shape, out_features, p, call_seed, dtype, device) -> torch.Tensor:
    x = (torch.rand(shape) + 0.5).to(dtype).to(device)
    weight = (torch.rand(out_features, shape[-1]) + 0.5).to(dtype).to(device)
    torch.manual_seed(call_seed)
    y = functional.linear_relu_dropout(x, weight, None, relu=False, p=p, training=True)
    return (y != 0).cpu()


def _fused_reference(x, weight, b, dy, mask, p, relu):
    """float64 output and grads of dropout(relu(linear)) with ``mask``; the masked output
    gradient g is rounded to the input dtype, as torch's dropout backward returns it."""
    x64, w64, b64 = (t.detach().cpu().double() for t in (x, weight, b))
    z = F.linear(x64, w64, b64)
    active = mask & (z > 0) if relu else mask
    y = torch.where(active, z / (1 - p), 0.0)
    g = (dy.cpu().double() * active / (1 - p)).to(x.dtype).double()
    g2d, x2d = g.reshape(-1, g.shape[-1]), x64.reshape(-1, x64.shape[-1])
    return y, [(g2d @ w64).reshape(x.shape), g2d.t() @ x2d, g2d.sum(0)]


FUSED_CASES = ["lenet_fc1_400to120", "alexnet_fc6_shrunk_576to96", "vgg_fc7_shrunk_96to96",
               "3d_input"]


@pytest.mark.gpu_check
@pytest.mark.parametrize("relu", [True, False], ids=["relu_dropout", "dropout"])
@pytest.mark.parametrize("dtype_id", ["fp32", "fp16"])
@pytest.mark.parametrize("case_id", FUSED_CASES)
def test_linear_relu_dropout_matches_torch_with_the_same_mask(case_id, dtype_id, relu, device):
    """bf16 has its own forward test: the Triton 3.6 interpreter truncates fp32 -> bf16
    casts, so the backward's rounded bf16 g cannot be modelled exactly on the CPU."""
    shape, out_features = LINEAR_CASES[case_id]
    dtype, tf32, tolerance = DTYPES[dtype_id]
    p = 0.4
    mask = _recover_mask(shape, out_features, p, 1234, dtype, device)
    x, weight, b = _operands(shape, out_features, dtype, device)
    torch.manual_seed(1234)
    with matmul_tf32(tf32):
        y = functional.linear_relu_dropout(x, weight, b, relu=relu, p=p, training=True)
        dy = random_input(y.shape, dtype, device)
        y.backward(dy)
    y_ref, grads_ref = _fused_reference(x, weight, b, dy, mask, p, relu)
    assert_close(y, y_ref, tolerance, shape[-1])
    assert not ((y != 0).cpu() & ~mask).any(), "a dropped element was kept"
    _check_grads([x.grad, weight.grad, b.grad], grads_ref, tolerance, shape, out_features,
                 ["input", "weight", "bias"])


@pytest.mark.parametrize("case_id", FUSED_CASES)
def test_bf16_linear_relu_dropout_forward(case_id, device):
    shape, out_features = LINEAR_CASES[case_id]
    mask = _recover_mask(shape, out_features, 0.4, 99, torch.bfloat16, device)
    x, weight, b = _operands(shape, out_features, torch.bfloat16, device, requires_grad=False)
    torch.manual_seed(99)
    y = functional.linear_relu_dropout(x, weight, b, relu=True, p=0.4, training=True)
    y_ref, _ = _fused_reference(x, weight, b, torch.zeros_like(y), mask, 0.4, True)
    assert_close(y, y_ref, torch.bfloat16, shape[-1])


def test_relu_without_dropout_and_eval_mode(device):
    x, weight, b = _operands((6, 48), 20, torch.float32, device)
    with matmul_tf32(False):
        y = functional.linear_relu_dropout(x, weight, b, relu=True, p=0.5, training=False)
        dy = random_input(y.shape, torch.float32, device)
        y.backward(dy)
    y_ref, grads_ref = reference_grads(lambda *t: torch.relu(F.linear(*t)), [x, weight, b], dy)
    assert_close(y, y_ref, torch.float32, 48)
    _check_grads([x.grad, weight.grad, b.grad], grads_ref, torch.float32, (6, 48), 20,
                 ["input", "weight", "bias"])


def test_fused_dropout_keeps_one_minus_p(device):
    """64 x 256 outputs of the GEMM epilogue: the kept fraction within 5 binomial sigmas."""
    p = 0.3
    mask = _recover_mask((64, 16), 256, p, 7, torch.float32, device)
    fraction = mask.double().mean().item()
    assert abs(fraction - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / mask.numel())


def test_p_one_drops_everything(device):
    x, weight, b = _operands((4, 24), 12, torch.float32, device)
    y = functional.linear_relu_dropout(x, weight, b, relu=True, p=1.0, training=True)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# ----------------------------------------------------------------------------- dropout

@pytest.mark.gpu_check
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_statistics_and_exact_scale(p, dtype, device):
    """Kept values are x * fp32(1 / (1 - p)) rounded once (bf16 is left out: the interpreter
    truncates fp32 -> bf16 casts)."""
    x = (torch.rand(64, 256) + 0.5).to(dtype).to(device)
    y = functional.dropout(x, p)
    kept = y != 0
    fraction = kept.double().mean().item()
    assert abs(fraction - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / x.numel())
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert y.dtype == dtype
    assert torch.equal(y[kept].cpu(), (x[kept].float().cpu() * scale).to(dtype))


def test_dropout_backward_uses_the_forward_mask(device):
    x = random_input((33, 70), torch.float32, device, requires_grad=True)
    y = functional.dropout(x, 0.5)
    dy = random_input(y.shape, torch.float32, device)
    y.backward(dy)
    kept = (y != 0).float()
    assert torch.equal(x.grad, dy * kept * 2.0)


def test_dropout_channels_last_keeps_its_layout(device):
    x = random_input((2, 8, 5, 5), torch.float32, device, channels_last=True,
                     requires_grad=True)
    y = functional.dropout(x, 0.5)
    y.backward(torch.ones_like(y))  # a contiguous gradient for a channels_last input
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x.grad, (y != 0).float() * 2.0)


def test_masks_differ_between_steps_and_repeat_after_reseeding(device):
    x = (torch.rand(32, 64) + 0.5).to(device)
    torch.manual_seed(5)
    first, second = functional.dropout(x, 0.5), functional.dropout(x, 0.5)
    torch.manual_seed(5)
    again = functional.dropout(x, 0.5)
    assert not torch.equal(first != 0, second != 0)
    assert torch.equal(first, again)
    fused_first = _recover_mask((32, 8), 64, 0.5, 5, torch.float32, device)
    fused_again = _recover_mask((32, 8), 64, 0.5, 5, torch.float32, device)
    fused_other = _recover_mask((32, 8), 64, 0.5, 6, torch.float32, device)
    assert torch.equal(fused_first, fused_again)
    assert not torch.equal(fused_first, fused_other)


def test_dropout_identity_cases(device):
    x = random_input((4, 9), torch.float32, device)
    assert functional.dropout(x, 0.5, training=False) is x
    assert functional.dropout(x, 0.0) is x
    assert torch.equal(functional.dropout(x, 1.0), torch.zeros_like(x))
    module = fastarch.nn.Dropout(0.5).eval()
    assert module(x) is x


def test_dropout_inplace(device):
    base = random_input((16, 30), torch.float32, device, requires_grad=True)
    x = base * 1.0
    module = fastarch.nn.Dropout(0.5, inplace=True)
    y = module(x)
    assert y is x
    y.backward(torch.ones_like(y))
    assert torch.equal(base.grad, (y != 0).float() * 2.0)
    assert torch.equal(y[y != 0], (base * 2.0)[y != 0])


def test_dropout_inplace_on_a_strided_view(device):
    buffer = random_input((6, 20), torch.float32, device)
    column_slice = buffer[:, ::2]
    before = column_slice.clone()
    y = functional.dropout(column_slice, 0.5, inplace=True)
    assert y is column_slice
    kept = y != 0
    assert torch.equal(y[kept], before[kept] * 2.0)
    assert 0 < kept.sum() < kept.numel()


def test_dropout_inplace_on_a_leaf_is_torchs_error(device):
    x = random_input((4, 4), torch.float32, device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        functional.dropout(x, 0.5, inplace=True)


# ----------------------------------------------------------------------------- GPU configs

@pytest.mark.parametrize("name", linear_ops.GEMM_TILES.keys())
def test_every_gpu_config_computes_the_gemm(name, device):
    """The shipped tiles themselves, with ragged edges and a ragged split-K tail, on the
    forward with its full epilogue (the interpreter otherwise runs its own tiles)."""
    config = linear_ops.GEMM_TILES[name]
    operand = Operand(name.rsplit("_", 1)[1])
    dtype = torch.bfloat16 if operand is Operand.SIXTEEN_BIT else torch.float32
    M, N, K = config.block_m + 3, config.block_n + 5, 3 * config.block_k + 7
    x, weight, b = _operands((M, K), N, dtype, device, requires_grad=False)
    tolerance = {Operand.SIXTEEN_BIT: dtype, Operand.TF32: "tf32",
                 Operand.IEEE: torch.float32}[operand]
    reference = torch.relu(F.linear(x.double(), weight.double(), b.double()))
    for splits in (1, 2):
        y = backend.empty((M, N), dtype, device)
        k_per_split = 2 * config.block_k if splits == 2 else K
        partial = backend.empty((splits, M, N), torch.float32, device)
        launches = [linear_kernels.gemm_launch(x, weight.t(), y if splits == 1 else partial, b,
                                               None, True, 0.0, operand, config, splits,
                                               k_per_split, "forward")]
        if splits == 2:
            launches.append(linear_kernels.split_k_epilogue_launch(
                partial, y, b, None, True, 0.0, linear_ops.ROW_TILE, "forward"))
        for launch in launches:
            launch()
        assert_close(y, reference, tolerance, K, name=f"{splits} splits")


def test_gpu_row_tile_and_dropout_configs(device):
    """The GPU's elementwise tiles: masked output gradient, bias partials and dropout."""
    M, N, p = 40, 300, 0.5
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    dy = random_input((M, N), torch.float32, device)
    g = backend.empty((M, N), torch.float32, device)
    partial = backend.empty((3, N), torch.float32, device)
    db = backend.empty((N,), torch.float32, device)
    linear_kernels.output_grad_launch(dy, None, seed, g, partial, False, p,
                                      linear_ops.ROW_TILE)()
    linear_kernels.sum_rows_launch(partial, db, linear_ops.ROW_TILE)()
    expected = backend.empty((M, N), torch.float32, device)
    dropout_kernels.dropout_launch(dy, expected, seed, p, dropout_ops.DROPOUT_TILE)()
    assert torch.equal(g, expected)  # one mask: the element's flat index, whatever the tile
    assert_close(db, g.double().sum(0), torch.float32, M)


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_module_is_torchs(bias, device):
    ours = fastarch.nn.Linear(40, 24, bias=bias).to(device)
    theirs = torch.nn.Linear(40, 24, bias=bias).to(device)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.state_dict().items())
    assert ours.extra_repr() == theirs.extra_repr()
    ours.load_state_dict(theirs.state_dict())
    x = random_input((5, 40), torch.float32, device)
    reference = F.linear(x.double(), theirs.weight.double(),
                         theirs.bias.double() if bias else None)
    with matmul_tf32(False):
        assert_close(ours(x), reference, torch.float32, 40)


def test_dropout_module_is_torchs():
    for p, inplace in ((0.5, False), (0.2, True)):
        ours, theirs = fastarch.nn.Dropout(p, inplace), torch.nn.Dropout(p, inplace)
        assert isinstance(ours, torch.nn.Dropout)
        assert ours.extra_repr() == theirs.extra_repr()
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastarch.nn.Dropout(1.5)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_torchs_errors(device):
    x, weight, b = _operands((3, 8), 5, torch.float32, device, requires_grad=False)
    with pytest.raises(RuntimeError, match="weight.*in_features=8"):
        functional.linear(random_input((3, 7), torch.float32, device), weight, b)
    with pytest.raises(RuntimeError, match="weight dtype torch.float16"):
        functional.linear(x, weight.half(), b)
    with pytest.raises(RuntimeError, match="bias dtype torch.bfloat16"):
        functional.linear(x, weight, b.bfloat16())
    with pytest.raises(RuntimeError, match="weight on meta"):
        functional.linear(x, weight.to("meta"), b)
    for bad_p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            functional.linear_relu_dropout(x, weight, b, p=bad_p)
        with pytest.raises(ValueError, match="between 0 and 1"):
            functional.dropout(x, bad_p)
    with pytest.raises(RuntimeError, match="floating-point input"):
        functional.dropout(x.int(), 0.5)


@pytest.mark.torch_fallback
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_input_runs_torchs_linear_and_is_counted(dtype, device):
    x, weight, b = (torch.randint(-4, 5, shape, device=device).to(dtype)
                    for shape in ((3, 8), (5, 8), (5,)))
    before = backend.fallback_counts["linear"]
    assert_same_outcome(lambda: functional.linear(x, weight, b),
                        lambda: F.linear(x, weight, b))  # bool: NotImplementedError
    assert backend.fallback_counts["linear"] == before + 1


@pytest.mark.torch_fallback
@pytest.mark.parametrize("shape", [(), (1,), (1, 5), (3, 5), (4,)],
                         ids=["scalar", "one", "row", "per_row", "too_short"])
def test_bias_torch_broadcasts_runs_torchs_linear_and_is_counted(shape, device):
    """torch adds any bias that broadcasts to the output (and raises for one that does not);
    our kernel takes one value per output feature."""
    x, weight, _ = _operands((3, 8), 5, torch.float32, device, requires_grad=False)
    b = random_input(shape, torch.float32, device)
    before = backend.fallback_counts["linear"]
    assert_same_outcome(lambda: functional.linear(x, weight, b), lambda: F.linear(x, weight, b))
    assert backend.fallback_counts["linear"] == before + 1


@pytest.mark.torch_fallback
def test_float64_runs_torchs_linear_and_dropout(device):
    x, weight, b = _operands((3, 8), 5, torch.float64, device, requires_grad=False)
    before = dict(backend.fallback_counts)
    assert torch.equal(functional.linear(x, weight, b), F.linear(x, weight, b))
    assert functional.dropout(x, 0.5).dtype == torch.float64
    assert backend.fallback_counts["linear"] == before.get("linear", 0) + 1
    assert backend.fallback_counts["dropout"] == before.get("dropout", 0) + 1


# ----------------------------------------------------------------------------- determinism

def test_two_runs_are_bitwise_equal(device):
    """The split-K sums, the bias partials and the mask all run in a fixed order."""
    def run():
        x, weight, b = _operands((6, 400), 120, torch.bfloat16, device)
        torch.manual_seed(3)
        y = functional.linear_relu_dropout(x, weight, b, relu=True, p=0.5, training=True)
        y.backward(torch.ones_like(y))
        return y, x.grad, weight.grad, b.grad
    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    second = run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
