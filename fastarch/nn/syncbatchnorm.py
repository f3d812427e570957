"""SyncBatchNorm: torch.nn.SyncBatchNorm with ``forward`` on fastarch's kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from fastarch import functional
from fastarch.nn.batchnorm import batch_norm_mode


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (arguments, parameters, buffers, state_dict, train/eval).

    Training in a process group of more than one process normalises with the statistics of
    the global batch: each process's Welford partials (count, mean, M2 per channel) are
    all-gathered through torch.distributed (gloo on the CPU, NCCL on CUDA) and merged with
    Chan's formula, and the running statistics are updated from them; backward all-reduces
    the per-channel sums of dy and dy * x_hat. Otherwise (eval, one process, no process
    group) it is fastarch's BatchNorm, as torch's SyncBatchNorm is F.batch_norm then."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        mode = batch_norm_mode(self)
        group = self._sync_group()
        if group is None:
            return functional.batch_norm(input, mode.running_mean, mode.running_var,
                                         self.weight, self.bias, mode.training, mode.momentum,
                                         self.eps)
        return functional.sync_batch_norm(input, mode.running_mean, mode.running_var,
                                          self.weight, self.bias, mode.momentum, self.eps,
                                          group)

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group to synchronise over in training; None when there is none."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module,
                               process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
        """Replace every BatchNorm*D (torch's or fastarch's) in ``module`` by a fastarch
        SyncBatchNorm sharing its parameters and buffers, as torch's classmethod does; a
        BatchNorm ``module`` itself comes back as a new SyncBatchNorm."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
