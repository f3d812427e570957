"""Linear layers (the classifiers): y = dropout(relu(x @ W^T + b)), forward and backward, on
one Triton GEMM kernel with the bias, ReLU and dropout in its epilogue.

The GEMM is C[M, N] = A[M, K] @ B[K, N] with every operand addressed through its strides, so
transposes are free views and one kernel runs the three products of a linear layer:
* forward       y  = x @ W^T   A = x [batch, in],  B = W^T (W [out, in] read transposed);
* input grad    dx = g @ W     A = g [batch, out], B = W;
* weight grad   dW = g^T @ x   A = g^T,            B = x.
Accumulation is fp32; the ``Operand`` a launch is given sets the dot's precision (fp32 runs
TF32 only where the host allows it). Row and column offsets are int64.

Split-K: a long reduction over few output tiles is split: split i writes its fp32 partial of
C, and a second kernel sums the partials in split order (``reduction.sum_in_order``) and
applies the epilogue. No atomics: bitwise deterministic.

Input prologue (PROLOGUE, IN_RELU, PROLOGUE_ON_B; ``nhwc.InputNormalization``): a linear layer
after a BatchNorm reads the raw x and applies relu?(x * in_scale[f] + in_shift[f]) per input
feature f (fp32 math, rounded back to x's dtype for the MMA; positions past the operand stay
0), so the normalised tensor is never written, forward or backward. x is A in the forward
(its columns k are the features) and B in the weight gradient (its columns n are):
PROLOGUE_ON_B says which of the two the prologue transforms.

Dropout keeps output element (m, n) by ``dropout.dropout_keep`` at the flat index m * N + n,
from the seed tensor the kernel reads; the mask is never stored: the backward regenerates it.

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

from .conv2d import prologue_suffix
from .dropout import dropout_keep, dropout_scale, seed_extent
from .launch import UNUSED, Extent, Launch, TileConfig, dense, vector
from .nhwc import InputNormalization, channel_vector, input_prologue, prologue_operands
from .reduction import sum_in_order
from .tensor_cores import Operand, dot, upcast_operands


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
def feature_vectors(in_scale_ptr, in_shift_ptr, f, f_ok, in_scale_s, in_shift_s):
    """The prologue's fp32 (scale, shift) of features ``f`` (0 where not ``f_ok``)."""
    return (channel_vector(in_scale_ptr, f * in_scale_s, f_ok),
            channel_vector(in_shift_ptr, f * in_shift_s, f_ok))


@triton.jit
def linear_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr,
    M, N, K, k_per_split,
    a_sm, a_sk, b_sk, b_sn, c_ss, c_sm, c_sn, bias_s,
    p, scale,
    in_scale_ptr, in_shift_ptr, in_scale_s, in_shift_s,  # last: the others keep their offsets
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    DROPOUT: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    PROLOGUE_ON_B: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
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
    if PROLOGUE and PROLOGUE_ON_B:  # B's columns are the features: one vector per program
        b_scale, b_shift = feature_vectors(in_scale_ptr, in_shift_ptr, n, n_ok, in_scale_s,
                                           in_shift_s)
    # At least one step (an empty reduction's is all masked): with a loop that may run no
    # step, ptxas sees the accumulator zeroed on the skipping path between the last wgmma and
    # its wait, and serializes every wgmma of the loop (warning C7515).
    for k0 in range(0, tl.maximum(k_count, 1), BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k < k_count - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PROLOGUE:
            k_in = k < k_count - k0  # all true with EVEN_K
            if PROLOGUE_ON_B:
                b = input_prologue(b, k_in[:, None] & n_ok[None, :], b_scale[None, :],
                                   b_shift[None, :], IN_RELU)
            else:
                a_scale, a_shift = feature_vectors(in_scale_ptr, in_shift_ptr, k_start + k0 + k,
                                                   k_in, in_scale_s, in_shift_s)
                a = input_prologue(a, m_ok[:, None] & k_in[None, :], a_scale[None, :],
                                   a_shift[None, :], IN_RELU)
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
    acc = sum_in_order(partial_ptr + m[:, None] * N + n[None, :], mask, splits, partial_ss)
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
    """out[n] = sum of the dense fp32 partial[0 .. rows-1, n] (rows >= 1), in row order."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = sum_in_order(partial_ptr + n, n_ok, rows, N)
    tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------- launches

def _epilogue_suffix(bias: torch.Tensor | None, relu: bool, p: float) -> str:
    flags = [flag for flag, on in (("bias", bias is not None), ("relu", relu),
                                   ("dropout", p > 0)) if on]
    return "".join(f"+{flag}" for flag in flags)


def _whole_steps(K: int, splits: int, k_per_split: int, block_k: int) -> bool:
    """Whether every split's reduction is whole BLOCK_K steps of A and B, none empty: the
    kernel's K loop then needs no mask."""
    return (K > 0 and K % block_k == 0 and k_per_split % block_k == 0
            and (splits - 1) * k_per_split < K)


def gemm_launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                seed: torch.Tensor | None, relu: bool, p: float, operand: Operand,
                config: TileConfig, splits: int, k_per_split: int,
                product: str, prologue: InputNormalization | None = None) -> Launch:
    """C = a @ b (+ epilogue); with ``splits`` > 1, ``c`` is the dense fp32 [splits, M, N]
    partial and the epilogue is left to the split-K epilogue launch. ``prologue``: x is read
    through it, a in the "forward" (K-long vectors), b in the "weight_grad" (N-long)."""
    M, K = a.shape
    N = b.shape[1]
    split = splits > 1
    c_ss, c_sm, c_sn = (c.stride() if split else (0, *c.stride()))
    prologue_on_b = product == "weight_grad"
    extra = prologue_operands(prologue, a, N if prologue_on_b else K)
    return Launch(
        linear_gemm_kernel, (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),
                             splits),
        args={"a_ptr": a, "b_ptr": b, "c_ptr": c, "bias_ptr": bias if bias is not None else c,
              "seed_ptr": seed if seed is not None else c, **extra.args,
              "M": M, "N": N, "K": K, "k_per_split": k_per_split,
              "a_sm": a.stride(0), "a_sk": a.stride(1), "b_sk": b.stride(0),
              "b_sn": b.stride(1), "c_ss": c_ss, "c_sm": c_sm, "c_sn": c_sn,
              "bias_s": bias.stride(0) if bias is not None else 0,
              "p": float(p), "scale": dropout_scale(p)},
        extents={"a_ptr": Extent((M, K), ("a_sm", "a_sk")),
                 "b_ptr": Extent((K, N), ("b_sk", "b_sn")),
                 "c_ptr": Extent((splits, M, N), ("c_ss", "c_sm", "c_sn")),
                 "bias_ptr": vector(None if split else bias, N, "bias_s"),
                 "seed_ptr": seed_extent(None if split or p == 0 else seed), **extra.extents},
        constexprs={"SPLIT_K": split,
                    "EVEN_K": _whole_steps(K, splits, k_per_split, config.block_k),
                    "HAS_BIAS": bias is not None and not split,
                    "RELU": relu and not split, "DROPOUT": p > 0 and not split,
                    **extra.constexprs, "PROLOGUE_ON_B": prologue is not None and prologue_on_b,
                    "DOT_PRECISION": operand.dot_precision,
                    "UPCAST_OPERANDS": upcast_operands(a.dtype),
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                    "BLOCK_K": config.block_k},
        num_warps=config.num_warps, num_stages=config.num_stages,
        name=(f"linear_{product}[{config.name}{prologue_suffix(extra.constexprs)}"
              f"{'+split_k' if split else _epilogue_suffix(bias, relu, p)}]"))


def split_k_epilogue_launch(partial: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                            seed: torch.Tensor | None, relu: bool, p: float,
                            config: TileConfig, product: str) -> Launch:
    """c = epilogue(the dense fp32 [splits, M, N] partials of a split-K GEMM, summed)."""
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
                 "seed_ptr": seed_extent(seed if p > 0 else None)},
        constexprs={"HAS_BIAS": bias is not None, "RELU": relu, "DROPOUT": p > 0,
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
        num_warps=config.num_warps,
        name=f"linear_{product}_split_k_epilogue[{config.name}{_epilogue_suffix(bias, relu, p)}]")


def output_grad_launch(dy: torch.Tensor, y: torch.Tensor | None, seed: torch.Tensor | None,
                       g: torch.Tensor | None, bias_partial: torch.Tensor | None, relu: bool,
                       p: float, config: TileConfig) -> Launch:
    """g = dy through dropout and ReLU (written when ``g`` is given; ``y`` is the forward's
    output with ReLU, ``seed`` its dropout seed) and g's per-row-tile column sums (into
    ``bias_partial`` when given)."""
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
                 "seed_ptr": seed_extent(seed if p > 0 and not relu else None),
                 "g_ptr": UNUSED if g is None else dense(M, N),
                 "bias_partial_ptr": UNUSED if bias_partial is None
                 else dense(tiles, N, dtypes=(torch.float32,))},
        constexprs={"RELU": relu, "DROPOUT": p > 0, "WRITE_GRAD": g is not None,
                    "BIAS_PARTIALS": bias_partial is not None,
                    "BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
        num_warps=config.num_warps,
        name=f"linear_output_grad[{config.name}{_epilogue_suffix(bias_partial, relu, p)}]")


def sum_rows_launch(partial: torch.Tensor, out: torch.Tensor, config: TileConfig) -> Launch:
    """out = the column sums of the dense fp32 [rows >= 1, N] partial, in row order."""
    rows, N = partial.shape
    return Launch(sum_rows_kernel, (triton.cdiv(N, config.block_n),),
                  args={"partial_ptr": partial, "out_ptr": out, "rows": rows, "N": N},
                  extents={"partial_ptr": dense(rows, N, dtypes=(torch.float32,)),
                           "out_ptr": dense(N)},
                  constexprs={"BLOCK_N": config.block_n}, num_warps=config.num_warps,
                  name=f"linear_bias_grad_merge[{config.name}]")


