"""Linear layers (the classifiers): y = dropout(relu(x @ W^T + b)), forward and backward, on
one Triton GEMM kernel with the bias, ReLU and dropout in its epilogue.

The GEMM is C[M, N] = A[M, K] @ B[K, N] with every operand addressed through its strides, so
transposes are free views and one kernel runs the three products of a linear layer:
* forward       y  = x @ W^T   A = x [batch, in],  B = W^T (W [out, in] read transposed);
* input grad    dx = g @ W     A = g [batch, out], B = W;
* weight grad   dW = g^T @ x   A = g^T,            B = x.
Accumulation is fp32; fp32 operands use TF32 only when ``torch.backends.cuda.matmul.allow_tf32``
is on. Row and column offsets are int64.

Split-K: at batch 64 a 9216 -> 4096 layer has 32 output tiles of 64x128 for 132 SMs and a
9216-long reduction, so the reduction is split: split i writes its fp32 partial of C, and a
second kernel sums the partials in split order and applies the epilogue. No atomics: bitwise
deterministic.

Dropout keeps output element (m, n) when Philox's uniform ``tl.rand(seed, m * N + n)`` is at
least p, and scales it by 1 / (1 - p). The seed is an int64 tensor drawn from torch's
generator on the input's device for every call (``torch.manual_seed`` reproduces it, each
step gets a new mask) and read by the kernel, so drawing it never waits for the GPU. The mask
is never stored: the backward regenerates it from the same seed.

Backward: one elementwise pass turns dy into g = dy masked by ReLU and dropout (stored in dy's
dtype, as torch's own backward would) and writes per-row-tile column sums of g, the bias
gradient's partials, which a second kernel adds in order: deterministic, no atomics. The
ReLU mask is recomputed from the saved output y, and with ReLU y carries the dropout mask
too: y > 0 exactly where the pre-activation was positive and the element kept, so
g = dy / (1 - p) where y > 0 and needs no Philox. Without ReLU the mask is regenerated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastarch import backend

from . import configs
from .launch import UNUSED, Extent, Launch, dense, flat, vector
from .tensor_cores import dot, operand_kind, upcast_operands

# Hopper's SM count, used where no device can be asked (the compile check's meta tensors).
SM90_SM_COUNT = 132


@triton.jit
def dropout_keep(seed_ptr, flat_index, p):
    """The dropout mask of the elements at ``flat_index`` (int64): kept with probability 1 - p."""
    return tl.rand(tl.load(seed_ptr), flat_index) >= p


@triton.jit
def epilogue(acc, m, n, n_ok, N, bias_ptr, bias_s, seed_ptr, p, scale,
             HAS_BIAS: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr):
    """bias (at stride ``bias_s``), ReLU, dropout on an fp32 [rows m, columns n] tile of an
    [M, N] output."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n * bias_s, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    if DROPOUT:
        keep = dropout_keep(seed_ptr, m[:, None] * N + n[None, :], p)
        acc = tl.where(keep, acc * scale, 0.0)
    return acc


@triton.jit
def linear_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr,
    M, N, K, k_per_split,
    a_sm, a_sk, b_sk, b_sn, c_ss, c_sm, c_sn, bias_s,
    p, scale,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row tiles vary fastest, so the programs reading one column tile of B (the weight, in
    # the forward and the input gradient) run together and B comes from DRAM about once.
    m_tiles = tl.cdiv(M, BLOCK_M)
    tile_m = tl.program_id(0) % m_tiles
    tile_n = tl.program_id(0) // m_tiles
    split = tl.program_id(1)
    m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    k_start = split.to(tl.int64) * k_per_split
    k_count = tl.minimum(K - k_start, k_per_split)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (m * a_sm)[:, None] + ((k_start + k) * a_sk)[None, :]
    b_ptrs = b_ptr + ((k_start + k) * b_sk)[:, None] + (n * b_sn)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_count, BLOCK_K):
        k_ok = k < k_count - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST_OPERANDS)
        a_ptrs += BLOCK_K * a_sk
        b_ptrs += BLOCK_K * b_sk
    c_offsets = (m * c_sm)[:, None] + (n * c_sn)[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K:
        tl.store(c_ptr + split.to(tl.int64) * c_ss + c_offsets, acc, mask=c_mask)
    else:
        acc = epilogue(acc, m, n, n_ok, N, bias_ptr, bias_s, seed_ptr, p, scale,
                       HAS_BIAS, RELU, DROPOUT)
        tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def linear_split_k_epilogue_kernel(
    partial_ptr, c_ptr, bias_ptr, seed_ptr,
    M, N, splits, partial_ss, c_sm, c_sn, bias_s, p, scale,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C = epilogue(sum of the dense fp32 [splits, M, N] partials, in split order)."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    mask = (m < M)[:, None] & n_ok[None, :]
    partial_ptrs = partial_ptr + m[:, None] * N + n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(splits):
        acc += tl.load(partial_ptrs, mask=mask, other=0.0)
        partial_ptrs += partial_ss
    acc = epilogue(acc, m, n, n_ok, N, bias_ptr, bias_s, seed_ptr, p, scale, HAS_BIAS, RELU,
                   DROPOUT)
    tl.store(c_ptr + (m * c_sm)[:, None] + (n * c_sn)[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_output_grad_kernel(
    dy_ptr, y_ptr, seed_ptr, g_ptr, bias_partial_ptr,
    M, N, dy_sm, dy_sn, y_sm, y_sn, p, scale,
    RELU: tl.constexpr, DROPOUT: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BIAS_PARTIALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g = dy through dropout and ReLU, into a dense [M, N] tensor, and this row tile's
    column sums of g (fp32) into row ``program_id(0)`` of the bias partials."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    mask = (m < M)[:, None] & n_ok[None, :]
    g = tl.load(dy_ptr + (m * dy_sm)[:, None] + (n * dy_sn)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + (m * y_sm)[:, None] + (n * y_sn)[None, :], mask=mask, other=0.0)
        g = tl.where(y <= 0.0, 0.0, g * scale)  # torch's threshold_backward: NaN passes
    elif DROPOUT:
        keep = dropout_keep(seed_ptr, m[:, None] * N + n[None, :], p)
        g = tl.where(keep, g * scale, 0.0)
    if WRITE_GRAD:
        tl.store(g_ptr + m[:, None] * N + n[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
    if BIAS_PARTIALS:
        column_sums = tl.sum(tl.where(mask, g, 0.0), axis=0)
        tl.store(bias_partial_ptr + tl.program_id(0).to(tl.int64) * N + n, column_sums,
                 mask=n_ok)


@triton.jit
def sum_rows_kernel(partial_ptr, out_ptr, rows, N, BLOCK_N: tl.constexpr):
    """out[n] = sum of the dense fp32 partial[0 .. rows-1, n], in row order."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    partial_ptrs = partial_ptr + n
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for _ in range(rows):
        acc += tl.load(partial_ptrs, mask=n_ok, other=0.0)
        partial_ptrs += N
    tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def dropout_kernel(x_ptr, y_ptr, seed_ptr, numel, p, scale, BLOCK: tl.constexpr):
    """y = x * mask / (1 - p) over a dense buffer, the mask keyed on the element's position;
    the backward runs it again on dy with the same seed."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < numel
    x = tl.load(x_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    y = tl.where(dropout_keep(seed_ptr, flat, p), x * scale, 0.0)
    tl.store(y_ptr + flat, y.to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launches

def dropout_scale(p: float) -> float:
    """1 / (1 - p), and 0 for p = 1 (every element dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def new_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's default generator on ``device``, as a 1-element tensor."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM90_SM_COUNT


def _seed_extent(seed: torch.Tensor | None) -> Extent:
    """The one int64 a dropout kernel reads its seed from (``UNUSED`` without dropout)."""
    return UNUSED if seed is None else dense(1, dtypes=(torch.int64,))


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every stride of these tensors is 1 or a multiple of 16 elements: what the JIT
    needs to know to use 16-byte loads and stores."""
    return all(stride == 1 or stride % 16 == 0 for t in tensors for stride in t.stride())


def _epilogue_suffix(bias: torch.Tensor | None, relu: bool, p: float) -> str:
    flags = [flag for flag, on in (("bias", bias is not None), ("relu", relu),
                                   ("dropout", p > 0)) if on]
    return "".join(f"+{flag}" for flag in flags)


def gemm_launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                seed: torch.Tensor | None, relu: bool, p: float, operand: str,
                config: configs.GemmConfig, splits: int, k_per_split: int,
                product: str) -> Launch:
    """C = a @ b (+ epilogue); with ``splits`` > 1, ``c`` is the dense fp32 [splits, M, N]
    partial and the epilogue is left to the split-K epilogue launch."""
    M, K = a.shape
    N = b.shape[1]
    split = splits > 1
    c_ss, c_sm, c_sn = (c.stride() if split else (0, *c.stride()))
    return Launch(
        linear_gemm_kernel, (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),
                             splits),
        args={"a_ptr": a, "b_ptr": b, "c_ptr": c, "bias_ptr": bias if bias is not None else c,
              "seed_ptr": seed if seed is not None else c,
              "M": M, "N": N, "K": K, "k_per_split": k_per_split,
              "a_sm": a.stride(0), "a_sk": a.stride(1), "b_sk": b.stride(0),
              "b_sn": b.stride(1), "c_ss": c_ss, "c_sm": c_sm, "c_sn": c_sn,
              "bias_s": bias.stride(0) if bias is not None else 0,
              "p": float(p), "scale": dropout_scale(p)},
        extents={"a_ptr": Extent((M, K), ("a_sm", "a_sk")),
                 "b_ptr": Extent((K, N), ("b_sk", "b_sn")),
                 "c_ptr": Extent((splits, M, N), ("c_ss", "c_sm", "c_sn")),
                 "bias_ptr": vector(None if split else bias, N, "bias_s"),
                 "seed_ptr": _seed_extent(None if split or p == 0 else seed)},
        constexprs={"SPLIT_K": split, "HAS_BIAS": bias is not None and not split,
                    "RELU": relu and not split, "DROPOUT": p > 0 and not split,
                    "DOT_PRECISION": "ieee" if operand == "ieee" else "tf32",
                    "UPCAST_OPERANDS": upcast_operands(a.dtype),
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                    "BLOCK_K": config.block_k},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=(f"linear_{product}[{config.name}"
              f"{'+split_k' if split else _epilogue_suffix(bias, relu, p)}]"))


def split_k_epilogue_launch(partial: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                            seed: torch.Tensor | None, relu: bool, p: float,
                            config: configs.RowTileConfig, product: str) -> Launch:
    splits, M, N = partial.shape
    return Launch(
        linear_split_k_epilogue_kernel,
        (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n)),
        args={"partial_ptr": partial, "c_ptr": c, "bias_ptr": bias if bias is not None else c,
              "seed_ptr": seed if seed is not None else c, "M": M, "N": N, "splits": splits,
              "partial_ss": partial.stride(0), "c_sm": c.stride(0), "c_sn": c.stride(1),
              "bias_s": bias.stride(0) if bias is not None else 0,
              "p": float(p), "scale": dropout_scale(p)},
        extents={"partial_ptr": Extent((splits, M, N), ("partial_ss", N, 1), (torch.float32,)),
                 "c_ptr": Extent((M, N), ("c_sm", "c_sn")),
                 "bias_ptr": vector(bias, N, "bias_s"),
                 "seed_ptr": _seed_extent(seed if p > 0 else None)},
        constexprs={"HAS_BIAS": bias is not None, "RELU": relu, "DROPOUT": p > 0,
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
        num_warps=config.num_warps,
        name=f"linear_{product}_split_k_epilogue[{config.name}{_epilogue_suffix(bias, relu, p)}]")


def gemm_plan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
              seed: torch.Tensor | None, relu: bool, p: float, operand: str,
              product: str) -> list[Launch]:
    """The launches computing c = epilogue(a @ b): one GEMM, or a split-K GEMM into an fp32
    partial (allocated here) and its epilogue."""
    M, K = a.shape
    N = b.shape[1]
    config = configs.linear_gemm_config(M, N, K, operand, aligned(a, b, c), p > 0,
                                        backend.INTERPRETER)
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    wanted = configs.linear_split_k(tiles, K, config.block_k, backend.INTERPRETER,
                                    sm_count(a.device))
    steps_per_split = triton.cdiv(triton.cdiv(K, config.block_k), wanted)
    k_per_split = max(steps_per_split, 1) * config.block_k
    splits = max(1, triton.cdiv(K, k_per_split))
    if splits == 1:
        return [gemm_launch(a, b, c, bias, seed, relu, p, operand, config, 1, k_per_split,
                            product)]
    partial = backend.empty((splits, M, N), torch.float32, a.device)
    return [gemm_launch(a, b, partial, bias, seed, relu, p, operand, config, splits,
                        k_per_split, product),
            split_k_epilogue_launch(partial, c, bias, seed, relu, p,
                                    configs.linear_row_tile_config(M, N, backend.INTERPRETER),
                                    product)]


def output_grad_launch(dy: torch.Tensor, y: torch.Tensor | None, seed: torch.Tensor | None,
                       g: torch.Tensor | None, bias_partial: torch.Tensor | None, relu: bool,
                       p: float, config: configs.RowTileConfig) -> Launch:
    M, N = dy.shape
    y_strides = y.stride() if y is not None else (0, 0)
    tiles = triton.cdiv(M, config.block_m)
    return Launch(
        linear_output_grad_kernel,
        (tiles, triton.cdiv(N, config.block_n)),
        args={"dy_ptr": dy, "y_ptr": y if y is not None else dy,
              "seed_ptr": seed if seed is not None else dy, "g_ptr": g if g is not None else dy,
              "bias_partial_ptr": bias_partial if bias_partial is not None else dy,
              "M": M, "N": N, "dy_sm": dy.stride(0), "dy_sn": dy.stride(1),
              "y_sm": y_strides[0], "y_sn": y_strides[1], "p": float(p),
              "scale": dropout_scale(p)},
        extents={"dy_ptr": Extent((M, N), ("dy_sm", "dy_sn")),
                 "y_ptr": Extent((M, N), ("y_sm", "y_sn")) if relu else UNUSED,
                 "seed_ptr": _seed_extent(seed if p > 0 and not relu else None),
                 "g_ptr": UNUSED if g is None else dense(M, N),
                 "bias_partial_ptr": UNUSED if bias_partial is None
                 else dense(tiles, N, dtypes=(torch.float32,))},
        constexprs={"RELU": relu, "DROPOUT": p > 0, "WRITE_GRAD": g is not None,
                    "BIAS_PARTIALS": bias_partial is not None,
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
        num_warps=config.num_warps,
        name=f"linear_output_grad[{config.name}{_epilogue_suffix(bias_partial, relu, p)}]")


def sum_rows_launch(partial: torch.Tensor, out: torch.Tensor,
                    config: configs.RowTileConfig) -> Launch:
    rows, N = partial.shape
    return Launch(sum_rows_kernel, (triton.cdiv(N, config.block_n),),
                  args={"partial_ptr": partial, "out_ptr": out, "rows": rows, "N": N},
                  extents={"partial_ptr": dense(rows, N, dtypes=(torch.float32,)),
                           "out_ptr": dense(N)},
                  constexprs={"BLOCK_N": config.block_n}, num_warps=config.num_warps,
                  name=f"linear_bias_grad_merge[{config.name}]")


def dropout_launch(x: torch.Tensor, y: torch.Tensor, seed: torch.Tensor, p: float,
                   config: configs.ElementwiseConfig) -> Launch:
    return Launch(dropout_kernel, (triton.cdiv(x.numel(), config.block),),
                  args={"x_ptr": x, "y_ptr": y, "seed_ptr": seed, "numel": x.numel(),
                        "p": float(p), "scale": dropout_scale(p)},
                  extents={"x_ptr": flat(x.numel()), "y_ptr": flat(x.numel()),
                           "seed_ptr": _seed_extent(seed)},
                  constexprs={"BLOCK": config.block}, num_warps=config.num_warps,
                  name=f"dropout[{config.name}]")


# ----------------------------------------------------------------------------- launchers

def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   relu: bool, p: float, seed: torch.Tensor | None,
                   allow_tf32: bool) -> torch.Tensor:
    """dropout(relu(x @ weight^T + bias)) for a 2-D x (any strides), in x's dtype; ``relu``
    and dropout (``p`` > 0, with ``seed``) are optional."""
    y = backend.empty((x.shape[0], weight.shape[0]), x.dtype, x.device)
    for launch in gemm_plan(x, weight.t(), y, bias, seed, relu, p,
                            operand_kind(x.dtype, allow_tf32), "forward"):
        launch()
    return y


def linear_output_grad(dy: torch.Tensor, y: torch.Tensor | None, seed: torch.Tensor | None,
                       relu: bool, p: float, bias_dtype: torch.dtype | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g (dy through dropout and ReLU; dy itself when neither ran) and, when ``bias_dtype``
    is given, the bias gradient: g's column sums in that dtype."""
    M, N = dy.shape
    masked = relu or p > 0
    if not masked and bias_dtype is None:
        return dy, None
    config = configs.linear_row_tile_config(M, N, backend.INTERPRETER)
    g = backend.empty((M, N), dy.dtype, dy.device) if masked else None
    partial = db = None
    if bias_dtype is not None:
        partial = backend.empty((triton.cdiv(M, config.block_m), N), torch.float32, dy.device)
        db = backend.empty((N,), bias_dtype, dy.device)
    output_grad_launch(dy, y, seed, g, partial, relu, p, config)()
    if db is not None:
        sum_rows_launch(partial, db, config)()
    return (g if masked else dy), db


def linear_backward(dy: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
                    y: torch.Tensor | None, seed: torch.Tensor | None, relu: bool, p: float,
                    bias_dtype: torch.dtype | None, allow_tf32: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of :func:`linear_forward` for a 2-D dy; dx needs ``weight``, dW needs
    ``x``, db needs ``bias_dtype``; whichever is not given is not computed. ``y`` is the
    forward's output when ``relu``, ``seed`` its dropout seed when ``p`` > 0."""
    g, db = linear_output_grad(dy, y, seed, relu, p, bias_dtype)
    operand = operand_kind(dy.dtype, allow_tf32)
    dx = dw = None
    if weight is not None:
        dx = backend.empty((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
        for launch in gemm_plan(g, weight, dx, None, None, False, 0.0, operand, "input_grad"):
            launch()
    if x is not None:
        dw = backend.empty((dy.shape[1], x.shape[1]), x.dtype, dy.device)
        for launch in gemm_plan(g.t(), x, dw, None, None, False, 0.0, operand, "weight_grad"):
            launch()
    return dx, dw, db


def dropout_forward(x: torch.Tensor, p: float, seed: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x * mask / (1 - p) for a dense x (contiguous or channels_last), into ``out`` (x itself
    for an in-place dropout) or a new tensor of x's layout; the mask follows memory order."""
    if out is None:
        out = backend.empty(x.shape, x.dtype, x.device, backend.memory_format_of(x))
    dropout_launch(x, out, seed, p, configs.dropout_config(x.numel(), backend.INTERPRETER))()
    return out


# ----------------------------------------------------------------------------- compile check

def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _layer_launches(batch: int, in_features: int, out_features: int, dtype: torch.dtype,
                    operand: str) -> list[Launch]:
    """What one training step of a Linear -> ReLU -> Dropout layer launches."""
    x = _meta((batch, in_features), dtype)
    weight = _meta((out_features, in_features), dtype)
    bias = _meta((out_features,), dtype)
    y = _meta((batch, out_features), dtype)
    seed = _meta((1,), torch.int64)
    row_tile = configs.LINEAR_ROW_TILE
    bias_partial = _meta((triton.cdiv(batch, row_tile.block_m), out_features), torch.float32)
    return [*gemm_plan(x, weight.t(), y, bias, seed, True, 0.5, operand, "forward"),
            output_grad_launch(y, y, seed, y, bias_partial, True, 0.5, row_tile),
            sum_rows_launch(bias_partial, bias, row_tile),
            *gemm_plan(y, weight, x, None, None, False, 0.0, operand, "input_grad"),
            *gemm_plan(y.t(), x, weight, None, None, False, 0.0, operand, "weight_grad")]


# (layer, dtype, operand) compiled: every classifier layer in bf16; TF32 on the layers that
# reach each TF32 tile; fp16 and fp32 without TF32 on one layer.
_SM90_RUNS = (
    *((layer, torch.bfloat16, "16bit") for layer in configs.LINEAR_LAYERS),
    ("alexnet_fc6_b64", torch.float32, "tf32"),
    ("alexnet_fc6_b256", torch.float32, "tf32"),
    ("lenet_fc1_b1024", torch.float32, "tf32"),
    ("lenet_fc3_b1024", torch.float32, "tf32"),
    ("alexnet_fc6_b256", torch.float16, "16bit"),
    ("alexnet_fc6_b256", torch.float32, "ieee"),
)


def sm90_launches() -> list[Launch]:
    """The GEMMs of a training step (Linear -> ReLU -> Dropout) of the layers in
    ``_SM90_RUNS`` and its elementwise kernels in bf16, the plain-Linear, dropout-only and
    eval-mode epilogues, and the standalone dropout; each distinct compilation once."""
    launches = []
    for layer, dtype, operand in _SM90_RUNS:
        step = _layer_launches(*configs.LINEAR_LAYERS[layer], dtype, operand)
        # The elementwise kernels hold at most 16 elements a thread: bf16 shows them.
        launches += [launch for launch in step
                     if dtype == torch.bfloat16 or launch.kernel is linear_gemm_kernel]
    x = _meta((256, 9216), torch.bfloat16)
    weight = _meta((4096, 9216), torch.bfloat16)
    y = _meta((256, 4096), torch.bfloat16)
    seed = _meta((1,), torch.int64)
    launches += gemm_plan(x, weight.t(), y, None, None, False, 0.0, "16bit", "forward")
    launches += gemm_plan(x, weight.t(), y, None, seed, False, 0.5, "16bit", "forward")
    # Eval mode (bias + ReLU, no dropout) at a batch large enough for no split: n128 tiles.
    eval_batch = _meta((1024, 4096), torch.bfloat16)
    launches += gemm_plan(eval_batch, _meta((4096, 4096), torch.bfloat16).t(), eval_batch,
                          _meta((4096,), torch.bfloat16), None, True, 0.0, "16bit", "forward")
    launches.append(output_grad_launch(y, None, seed, y, None, False, 0.5,
                                       configs.LINEAR_ROW_TILE))
    launches.append(dropout_launch(x, x, seed, 0.5, configs.DROPOUT_CONFIG))
    distinct: dict[tuple, Launch] = {}
    for launch in launches:
        distinct.setdefault(_compile_key(launch), launch)
    return list(distinct.values())


def _compile_key(launch: Launch) -> tuple:
    """What a compilation depends on besides the kernel and constexprs (in the name): the
    tensors' dtypes and, for the GEMM (the one near the register limit), the integers the JIT
    specializes (equal to 1, divisible by 16)."""
    def kind(value):
        if hasattr(value, "dtype"):
            return str(value.dtype)
        if isinstance(value, int) and not isinstance(value, bool) \
                and launch.kernel is linear_gemm_kernel:
            return value == 1, value % 16 == 0
        return type(value).__name__
    return launch.name, tuple(kind(value) for value in launch.args.values())
