"""The per-step pieces of a DINO update: teacher EMA, per-parameter clipping, the frozen last layer,
and the weight-decay parameter groups that the schedules drive."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAST_LAYER = "last_layer"  # DINOHead's prototype layer, matched by parameter name
DECAY_KEY = "apply_weight_decay"  # marks the parameter groups that follow the weight-decay schedule


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over parameters only (the teacher keeps its
    own buffers). Matched by name, so a wrapped student (DDP's ``module.``) fails loudly instead of silently
    pairing the wrong tensors."""
    student_params, teacher_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        missing = sorted(student_params.keys() ^ teacher_params.keys())[:5]
        raise ValueError(f"student and teacher parameters differ, e.g. {missing}; unwrap the student first")
    names = list(teacher_params)
    torch._foreach_lerp_([teacher_params[n] for n in names], [student_params[n].detach() for n in names], 1.0 - momentum)


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient to an L2 norm of at most ``clip`` (DINO clips per tensor); returns the
    norms before clipping as a tensor, so no host-device synchronisation is forced."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.empty(0)
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the prototype layer's gradients in the first ``freeze_last_layer`` epochs (DINO: it destabilises)."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if LAST_LAYER in name:
            param.grad = None


def weight_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups of the trainable parameters, weights decayed, biases and norms not, with their ``names``."""
    decayed, not_decayed = {"params": [], "names": []}, {"params": [], "names": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = decayed if param.ndim > 1 else not_decayed
            group["params"].append(param)
            group["names"].append(name)
    return [{**decayed, DECAY_KEY: True}, {**not_decayed, DECAY_KEY: False, "weight_decay": 0.0}]


def set_lr_and_weight_decay(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply one iteration's scheduled values: lr to every group, weight decay only to decayed groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get(DECAY_KEY, False):
            group["weight_decay"] = weight_decay
