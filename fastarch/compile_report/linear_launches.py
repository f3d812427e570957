"""The linear family's report cases: the GEMMs of a training step of every classifier layer
(forward with its bias/ReLU/dropout epilogue, input and weight gradients, split-K epilogues),
the elementwise kernels around them, and the standalone dropout."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import triton

from fastarch.compile_report.cases import Case, TileChoice, cases, matrix
from fastarch.kernels import dropout, linear
from fastarch.kernels.tensor_cores import Operand
from fastarch.ops import dropout as dropout_ops
from fastarch.ops import linear as linear_ops

# The classifier layers the linear tiles are meant for: name -> (batch, in, out features).
LINEAR_LAYERS: dict[str, tuple[int, int, int]] = {
    "alexnet_fc6_b64": (64, 9216, 4096),
    "alexnet_fc6_b256": (256, 9216, 4096),
    "fc7_b64": (64, 4096, 4096),
    "fc7_b256": (256, 4096, 4096),
    "fc8_b64": (64, 4096, 1000),
    "fc8_b256": (256, 4096, 1000),
    "lenet_fc1_b1024": (1024, 400, 120),
    "lenet_fc2_b1024": (1024, 120, 84),
    "lenet_fc3_b1024": (1024, 84, 10),
}

# (layer, dtype, operand) compiled: every classifier layer in bf16; TF32 on the layers that
# reach each TF32 tile; fp16 and fp32 without TF32 on one layer.
LINEAR_RUNS = (
    *((layer, torch.bfloat16, Operand.SIXTEEN_BIT) for layer in LINEAR_LAYERS),
    ("alexnet_fc6_b64", torch.float32, Operand.TF32),
    ("alexnet_fc6_b256", torch.float32, Operand.TF32),
    ("lenet_fc1_b1024", torch.float32, Operand.TF32),
    ("lenet_fc3_b1024", torch.float32, Operand.TF32),
    ("alexnet_fc6_b256", torch.float16, Operand.SIXTEEN_BIT),
    ("alexnet_fc6_b256", torch.float32, Operand.IEEE),
)


def gemm_cases(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: Optional[torch.Tensor],
               seed: Optional[torch.Tensor], relu: bool, p: float, operand: Operand,
               product: str, dtype: torch.dtype, choice: TileChoice) -> list[Case]:
    """What ``gemm_plan`` launches for c = epilogue(a @ b) on its static tile and, in a
    report of candidates, on each candidate (the split-K plan each tile brings)."""
    M, K = a.shape
    N = b.shape[1]
    static = linear_ops.gemm_tile(M, N, K, operand, linear_ops.aligned(a, b, c), p > 0)
    candidates = partial(linear_ops.gemm_candidates, static, M, N, p > 0)
    return [case for tile in choice.tiles(static, dtype, candidates)
            for case in cases(dtype, linear_ops.gemm_launches(a, b, c, bias, seed, relu, p,
                                                                operand, product, tile),
                              tile is not static)]


def _training_step(batch: int, in_features: int, out_features: int, dtype: torch.dtype,
                   operand: Operand, choice: TileChoice) -> list[Case]:
    """What one training step of a Linear -> ReLU -> Dropout layer launches: its GEMMs, and
    in bf16 its elementwise kernels (they hold at most 16 elements a thread, which bf16
    shows)."""
    x, weight = matrix(batch, in_features, dtype=dtype), matrix(out_features, in_features,
                                                                dtype=dtype)
    bias, y = matrix(out_features, dtype=dtype), matrix(batch, out_features, dtype=dtype)
    seed = matrix(1, dtype=torch.int64)
    row_tile = linear_ops.ROW_TILE
    bias_partial = matrix(triton.cdiv(batch, row_tile.block_m), out_features,
                          dtype=torch.float32)
    elementwise = cases(dtype, [
        linear.output_grad_launch(y, y, seed, y, bias_partial, True, 0.5, row_tile),
        linear.sum_rows_launch(bias_partial, bias, row_tile)])
    found = [*gemm_cases(x, weight.t(), y, bias, seed, True, 0.5, operand, "forward", dtype,
                         choice),
             *(elementwise if dtype == torch.bfloat16 else []),
             *gemm_cases(y, weight, x, None, None, False, 0.0, operand, "input_grad", dtype,
                         choice),
             *gemm_cases(y.t(), x, weight, None, None, False, 0.0, operand, "weight_grad",
                         dtype, choice)]
    return [case for case in found if dtype == torch.bfloat16
            or case.launch.kernel is linear.linear_gemm_kernel]


def linear_cases(choice: TileChoice) -> list[Case]:
    """The training step of the layers in ``LINEAR_RUNS``, the plain-Linear, dropout-only
    and eval-mode epilogues, and the standalone dropout, all bf16."""
    found = []
    for layer, dtype, operand in LINEAR_RUNS:
        found += _training_step(*LINEAR_LAYERS[layer], dtype, operand, choice)
    x, weight, y = matrix(256, 9216), matrix(4096, 9216), matrix(256, 4096)
    seed = matrix(1, dtype=torch.int64)
    sixteen_bit, bf16 = Operand.SIXTEEN_BIT, torch.bfloat16
    found += gemm_cases(x, weight.t(), y, None, None, False, 0.0, sixteen_bit, "forward", bf16,
                        choice)
    found += gemm_cases(x, weight.t(), y, None, seed, False, 0.5, sixteen_bit, "forward", bf16,
                        choice)
    # Eval mode (bias + ReLU, no dropout) at a batch large enough for no split: n128 tiles.
    eval_batch = matrix(1024, 4096)
    found += gemm_cases(eval_batch, matrix(4096, 4096).t(), eval_batch, matrix(4096), None,
                        True, 0.0, sixteen_bit, "forward", bf16, choice)
    found += cases(bf16, [linear.output_grad_launch(y, None, seed, y, None, False, 0.5,
                                                    linear_ops.ROW_TILE)])
    for tile in choice.elementwise_tiles(dropout_ops.DROPOUT_TILE, bf16):
        found += cases(bf16, [dropout.dropout_launch(x, x, seed, 0.5, tile)],
                       tile is not dropout_ops.DROPOUT_TILE)
    return found
