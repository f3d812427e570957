"""SyncBatchNorm's operator and host side: BatchNorm in training over the global batch of a
process group. Every process's Welford partials (merged over its own tiles) are gathered and
merged by ``fastarch::batch_norm_finalize`` into the global statistics; the normalising op,
``fastarch::sync_batch_norm``, all-reduces the backward sums. Both collectives are torch's
functional all-reduce (``ops.batch_norm.all_reduce_sum``), an operator that names its process
group, as a schema can (``group_name``: a ProcessGroup cannot be an operator argument).
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastarch import profiling
from fastarch.kernels.batch_norm import BatchNormStatistics
from fastarch.kernels.runtime import memory_format_of
from fastarch.kernels.welford import merge_welford_partials
from fastarch.ops.batch_norm import (all_reduce_sum, batch_norm_finalize, batch_norm_grads,
                                     batch_norm_setup, batch_norm_welford_partials,
                                     detached, normalized)
from fastarch.ops.common import fake_empty, no_grads


@torch.library.custom_op("fastarch::sync_batch_norm", mutates_args=())
def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                    invstd: Tensor, scale: Tensor, shift: Tensor, group_name: str) -> Tensor:
    """Training ``batch_norm`` (no ReLU) of this process's 4-D x with the statistics of the
    global batch of the process group named ``group_name``: backward all-reduces the sums of
    dy and dy * x_hat over the group. dweight and dbias stay local, as in torch's
    SyncBatchNorm: DistributedDataParallel averages parameter gradients."""
    return normalized(x, BatchNormStatistics(mean, invstd, scale, shift), False)


@sync_batch_norm.register_fake
def _(x, weight, bias, mean, invstd, scale, shift, group_name):
    return fake_empty(x.shape, x.dtype, x, memory_format_of(x))


def _sync_batch_norm_setup(ctx, inputs, output) -> None:
    *normalising, group_name = inputs
    batch_norm_setup(ctx, (*normalising, True, False), output)
    ctx.group_name = group_name


@profiling.op_range("sync_batch_norm.backward")
def _sync_batch_norm_grads(ctx, dy: Tensor):
    return *batch_norm_grads(ctx, dy), *no_grads(5)


sync_batch_norm.register_autograd(_sync_batch_norm_grads, setup_context=_sync_batch_norm_setup)


def _rank_partials(x: Tensor) -> Tensor:
    """This process's Welford partials of a 4-D x merged over its pixel tiles (Chan's
    formula): one [3, C] fp32 (count, mean, M2); zeros for an empty local batch."""
    if x.numel() == 0:
        return torch.zeros((3, x.shape[1]), dtype=torch.float32, device=x.device)
    count, mean, m2 = batch_norm_welford_partials(x.detach()).unbind(0)
    total = count.sum(0)
    merged_mean, variance = merge_welford_partials(count, mean, m2)
    return torch.stack([total, merged_mean, variance * total])


def sync_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], momentum: float,
                 eps: float, group: dist.ProcessGroup) -> Tensor:
    """Training BatchNorm of a 4-D x over the global batch of ``group``: every process's
    partials in rank order (an all-reduce of one slot a rank, the others zero: an exact
    gather of partials of any batch size) are the tiles the finalize merges, so every
    process computes the same statistics and running-statistics update."""
    slots = x.new_zeros((3, dist.get_world_size(group), x.shape[1]), dtype=torch.float32)
    slots[:, dist.get_rank(group)] = _rank_partials(x)
    gathered = all_reduce_sum(slots, group.group_name)
    stats = batch_norm_finalize(*gathered.unbind(0), detached(weight), detached(bias),
                                running_mean, running_var, momentum, eps)
    return sync_batch_norm(x, weight, bias, *stats, group.group_name)
