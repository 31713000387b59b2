"""DINO self-supervised training, one unit per concept: head, loss, schedules, the per-step
optimisation pieces, the multi-crop wrapper and the batched multi-crop augmentations."""
from hipt_e2e.ssl.augment import RegionMultiCrop, TileMultiCrop
from hipt_e2e.ssl.head import DINOHead
from hipt_e2e.ssl.loss import DINOLoss
from hipt_e2e.ssl.multicrop import MultiCropWrapper
from hipt_e2e.ssl.optim import (
                                cancel_last_layer_gradients,
                                clip_gradients_per_parameter,
                                set_lr_and_weight_decay,
                                update_teacher,
                                weight_decay_groups,
)
from hipt_e2e.ssl.schedules import cosine_schedule, scaled_lr, teacher_temperature_schedule

__all__ = [
    "DINOHead", "DINOLoss", "MultiCropWrapper", "RegionMultiCrop", "TileMultiCrop", "cancel_last_layer_gradients",
    "clip_gradients_per_parameter", "cosine_schedule", "scaled_lr", "set_lr_and_weight_decay",
    "teacher_temperature_schedule", "update_teacher", "weight_decay_groups",
]
