"""BatchNorm2d: torch.nn's own class with ``forward`` on fastarch's kernels."""
from __future__ import annotations

import torch
from torch import nn

from fastarch import functional


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (arguments, parameters, buffers, state_dict, train/eval) with
    fp32 statistics whatever the input dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = self._average_factor()
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or self.running_mean is None
        # Running statistics are read in eval, and updated in training when tracked.
        keep_running = not self.training or self.track_running_stats
        return functional.batch_norm(
            input, self.running_mean if keep_running else None,
            self.running_var if keep_running else None, self.weight, self.bias,
            use_batch_stats, factor, self.eps)

    def _average_factor(self) -> float:
        """The running statistics' update factor, counting this batch as torch does:
        ``momentum``, or 1/num_batches_tracked (a cumulative average) when it is None."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum
