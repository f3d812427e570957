"""BatchNorm2d: torch.nn's own class with ``forward`` on fastarch's kernels, and
``batch_norm_mode``: what every BatchNorm forward (this one, SyncBatchNorm's, a fused run's)
passes to the functional batch norm, decided as torch.nn's ``_BatchNorm.forward`` decides it."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from fastarch import functional


class BatchNormMode(NamedTuple):
    """F.batch_norm's arguments that depend on the module's mode."""
    running_mean: Optional[torch.Tensor]  # None: training without tracked statistics
    running_var: Optional[torch.Tensor]
    training: bool  # normalise with the batch's statistics
    momentum: float  # the running statistics' update factor


def uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Batch statistics in training, and in eval when there are no running statistics."""
    return bn.training or bn.running_mean is None


def batch_norm_mode(bn: nn.modules.batchnorm._BatchNorm) -> BatchNormMode:
    """What this forward of ``bn`` passes to F.batch_norm. It counts the batch as torch does
    (``num_batches_tracked`` grows by one in training with tracked statistics), so it is
    called once per forward, after the input checks. The update factor is ``momentum``, or
    1/num_batches_tracked (a cumulative average) when momentum is None."""
    counted = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if counted:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is not None:
        factor = bn.momentum
    else:
        factor = 1.0 / float(bn.num_batches_tracked) if counted else 0.0
    # Running statistics are read in eval, and updated in training when tracked.
    keep_running = not bn.training or bn.track_running_stats
    return BatchNormMode(bn.running_mean if keep_running else None,
                         bn.running_var if keep_running else None,
                         uses_batch_statistics(bn), factor)


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (arguments, parameters, buffers, state_dict, train/eval) with
    fp32 statistics whatever the input dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        mode = batch_norm_mode(self)
        return functional.batch_norm(input, mode.running_mean, mode.running_var, self.weight,
                                     self.bias, mode.training, mode.momentum, self.eps)
