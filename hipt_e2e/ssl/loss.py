"""The DINO self-distillation loss with its centred, sharpened teacher."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hipt_e2e.errors import SettingError
from hipt_e2e.ssl.schedules import teacher_temperature_schedule

N_GLOBAL_CROPS = 2  # the teacher only sees the two global crops


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student over every pair (teacher global crop i, student crop v != i).

    Outputs are stacked crop-major: student [ncrops*B, K], teacher [2*B, K]. The loss is computed in the
    center buffer's precision, so a float16/bfloat16 model output does not degrade the log-softmax.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if ncrops <= N_GLOBAL_CROPS:
            raise SettingError(f"ncrops must exceed the {N_GLOBAL_CROPS} global crops, got {ncrops}")
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                                          nepochs)

    def teacher_temperature(self, epoch: int) -> float:
        # Past the scheduled epochs (e.g. a run extended on resume) the final temperature holds.
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        dtype = self.center.dtype
        student_logp = F.log_softmax(student_output.to(dtype) / self.student_temp, dim=-1)
        student_logp = student_logp.reshape(self.ncrops, -1, student_logp.shape[-1])
        teacher_output = teacher_output.detach().to(dtype)
        teacher_p = F.softmax((teacher_output - self.center) / self.teacher_temperature(epoch), dim=-1)
        teacher_p = teacher_p.reshape(N_GLOBAL_CROPS, -1, teacher_p.shape[-1])

        # pair_losses[i, v] = mean over the batch of the cross-entropy H(teacher crop i, student crop v)
        pair_losses = -torch.einsum("ibk,vbk->ivb", teacher_p, student_logp).mean(dim=-1)
        same_crop = torch.eye(N_GLOBAL_CROPS, self.ncrops, dtype=torch.bool, device=pair_losses.device)
        loss = pair_losses.masked_fill(same_crop, 0.0).sum() / (N_GLOBAL_CROPS * self.ncrops - N_GLOBAL_CROPS)

        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch: keeps it from collapsing onto one dimension."""
        batch_sum = teacher_output.to(self.center.dtype).sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)
