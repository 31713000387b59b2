"""Tests of the DINO building blocks in hipt_e2e.ssl (facts: shared/reference/HIPT_FACTS.md, DINO)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from hipt_e2e.normalise import normalise
from hipt_e2e.ssl import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    RegionMultiCrop,
    TileMultiCrop,
    augment,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    colour,
    cosine_schedule,
    scaled_lr,
    set_lr_and_weight_decay,
    teacher_temperature_schedule,
    update_teacher,
    weight_decay_groups,
)
from hipt_e2e.ssl import loss as loss_module


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- loss

def _reference_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    student = torch.sin(torch.arange(32, dtype=torch.float64)).reshape(8, 4)
    teacher = torch.cos(torch.arange(16, dtype=torch.float64)).reshape(4, 4)
    return student, teacher


def test_loss_matches_reference_vector() -> None:
    student, teacher = _reference_outputs()
    dino_loss = DINOLoss(4, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04,
                         warmup_teacher_temp_epochs=0, nepochs=1).double()
    assert dino_loss(student, teacher, epoch=0).item() == pytest.approx(6.567276488940525, abs=1e-12)
    expected_center = [0.026118, 0.020507, -0.003958, -0.024784]
    np.testing.assert_allclose(dino_loss.center[0].numpy(), expected_center, atol=5e-7)
    assert dino_loss(student, teacher, epoch=0).item() == pytest.approx(6.554745347830306, abs=1e-12)


def test_center_is_updated_after_the_loss_as_an_ema_of_the_teacher_mean() -> None:
    student, teacher = _reference_outputs()
    dino_loss = DINOLoss(4, 4, 0.04, 0.04, 0, 1).double()
    student = student.clone().requires_grad_()
    dino_loss(student, teacher, 0).backward()
    first = 0.1 * teacher.mean(dim=0)
    torch.testing.assert_close(dino_loss.center[0], first)
    dino_loss(student, teacher, 0)
    torch.testing.assert_close(dino_loss.center[0], 0.9 * first + 0.1 * teacher.mean(dim=0))
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_center_averages_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a 2-process group: the other process contributes a batch of its own."""
    _, teacher = _reference_outputs()
    other = teacher + 1.0
    monkeypatch.setattr(loss_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loss_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(loss_module.dist, "all_reduce", lambda tensor: tensor.add_(other.sum(0, keepdim=True)))
    dino_loss = DINOLoss(4, 4, 0.04, 0.04, 0, 1).double()
    dino_loss.update_center(teacher)
    torch.testing.assert_close(dino_loss.center[0], 0.1 * torch.cat([teacher, other]).mean(dim=0))


def test_loss_uses_the_epochs_teacher_temperature() -> None:
    dino_loss = DINOLoss(4, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5)
    assert [dino_loss.teacher_temperature(e) for e in range(7)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07])


# ---------------------------------------------------------------- schedules

def test_cosine_schedule_with_warmup_against_hand_values() -> None:
    cos_quarter = 0.5 * (1 + math.cos(math.pi / 4))  # 0.8535533905932737
    lr = cosine_schedule(1.0, 0.0, epochs=3, iters_per_epoch=2, warmup_epochs=1, start_warmup=0.0)
    np.testing.assert_allclose(lr, [0.0, 1.0, 1.0, cos_quarter, 0.5, 1 - cos_quarter], atol=1e-15)


def test_weight_decay_and_momentum_schedules_against_hand_values() -> None:
    wd = cosine_schedule(0.04, 0.4, epochs=1, iters_per_epoch=4)
    np.testing.assert_allclose(wd, [0.04, 0.0927207793864215, 0.22, 0.3472792206135785], atol=1e-15)
    momentum = cosine_schedule(0.996, 1.0, epochs=2, iters_per_epoch=2)
    np.testing.assert_allclose(momentum, [0.996, 0.9965857864376269, 0.998, 0.9994142135623731], atol=1e-15)


def test_lr_scaling_and_teacher_temperature_schedule() -> None:
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert scaled_lr(5e-4, 256) == 5e-4
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 3, 4), [0.04, 0.055, 0.07, 0.07])
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, epochs=1, iters_per_epoch=2, warmup_epochs=2)


# ---------------------------------------------------------------- optimisation pieces

def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_teacher_ema_updates_parameters_only() -> None:
    torch.manual_seed(0)
    student, teacher = _small_net(), _small_net()
    student[1].running_mean.fill_(5.0)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    update_teacher(student, teacher, momentum=0.9)
    for name, param in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        torch.testing.assert_close(param, expected)
    assert torch.all(teacher[1].running_mean == 0)
    with pytest.raises(ValueError, match="differ"):
        update_teacher(nn.Sequential(student), teacher, 0.9)


def test_gradient_clipping_is_per_parameter() -> None:
    net = nn.Linear(2, 2)
    net.weight.grad = torch.full((2, 2), 3.0)  # norm 6 -> clipped to 3
    net.bias.grad = torch.tensor([0.6, 0.8])  # norm 1 -> untouched
    norms = clip_gradients_per_parameter(net, clip=3.0)
    torch.testing.assert_close(norms, torch.tensor([6.0, 1.0]))
    torch.testing.assert_close(net.weight.grad, torch.full((2, 2), 1.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(net.bias.grad, torch.tensor([0.6, 0.8]))


def _wrapped_model() -> MultiCropWrapper:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))  # for 3 x 4 x 4 crops
    return MultiCropWrapper(backbone, DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6, norm_last_layer=False))


@pytest.mark.parametrize(("epoch", "dropped"), [(0, True), (1, False)])
def test_last_layer_gradients_cancelled_during_frozen_epochs(epoch: int, dropped: bool) -> None:
    model = _wrapped_model()
    model([torch.randn(2, 3, 4, 4)]).sum().backward()
    cancel_last_layer_gradients(model, epoch=epoch, freeze_last_layer=1)
    for name, param in model.named_parameters():
        assert (param.grad is None) == (dropped and "last_layer" in name), name


def test_weight_decay_groups_and_scheduled_values() -> None:
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6)  # weight_g frozen: left out
    decayed, not_decayed = weight_decay_groups(head)
    assert [p.ndim for p in decayed["params"]] == [2, 2, 2, 2]  # mlp.{0,2,4}.weight, last_layer.weight_v
    assert [p.ndim for p in not_decayed["params"]] == [1, 1, 1]  # the three biases
    assert decayed["names"] == ["mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_v"]
    assert not_decayed["names"] == ["mlp.0.bias", "mlp.2.bias", "mlp.4.bias"]
    optimizer = torch.optim.AdamW([decayed, not_decayed])
    set_lr_and_weight_decay(optimizer, lr=0.01, weight_decay=0.3)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.01, 0.3), (0.01, 0.0)]
    assert optimizer.state_dict()["param_groups"][0]["names"] == decayed["names"]  # saved with the state


# ---------------------------------------------------------------- head and wrapper

def test_head_state_dict_matches_released_layout() -> None:
    head = DINOHead(384)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256),
    }


def test_head_weight_g_is_frozen_at_one_and_matches_torch_weight_norm() -> None:
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=6)
    assert not head.last_layer.weight_g.requires_grad
    torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0).zero_grad()
    head(torch.randn(5, 8)).sum().backward()
    assert head.last_layer.weight_g.grad is None and torch.all(head.last_layer.weight_g == 1)
    assert DINOHead(8, out_dim=16, norm_last_layer=False).last_layer.weight_g.requires_grad

    with warnings.catch_warnings():  # the deprecated API is the one the released checkpoints used
        warnings.simplefilter("ignore", FutureWarning)
        reference = nn.utils.weight_norm(nn.Linear(6, 16, bias=False))
    reference.load_state_dict(head.last_layer.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(head.last_layer(x), reference(x))


def test_multicrop_wrapper_runs_backbone_once_per_crop_size() -> None:
    calls = []
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    head = nn.Identity()
    crops = [torch.randn(2, 3, 8, 8)] * 2 + [torch.randn(2, 3, 4, 4) for _ in range(3)]
    out = MultiCropWrapper(backbone, head)(crops)
    assert calls == [4, 6]
    torch.testing.assert_close(out, torch.cat([crop.mean(dim=(2, 3)) for crop in crops]))
    assert {name.split(".")[0] for name in _wrapped_model().state_dict()} == {"backbone", "head"}


# ---------------------------------------------------------------- batched colour ops against torchvision

@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (colour.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (colour.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (colour.adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
        (colour.adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
    ],
)
def test_colour_ops_match_torchvision_per_sample(
    ours: Callable[..., torch.Tensor], theirs: Callable[..., torch.Tensor], factors: list[float]
) -> None:
    images = torch.rand(3, 3, 9, 7, generator=_generator())
    images[0, :, 0, 0] = 0.5  # a grey pixel: hue undefined, must stay grey
    expected = torch.stack([theirs(image, factor) for image, factor in zip(images, factors)])
    torch.testing.assert_close(ours(images, torch.tensor(factors)), expected, atol=2e-6, rtol=0)


def test_grayscale_blur_and_solarise_match_torchvision() -> None:
    images = torch.rand(2, 3, 16, 16, generator=_generator())
    torch.testing.assert_close(colour.grayscale(images), TF.rgb_to_grayscale(images))
    sigmas = [0.1, 1.7]
    expected = torch.stack([TF.gaussian_blur(im, [13, 13], [s, s]) for im, s in zip(images, sigmas)])
    torch.testing.assert_close(colour.gaussian_blur(images, torch.tensor(sigmas), radius=6), expected)
    torch.testing.assert_close(colour.solarise(images), TF.solarize(images, threshold=0.5))



def test_blur_sigma_is_relative_to_the_crop_size() -> None:
    """DINO's 0.1-2.0 px at 224 / 96 px crops; a 56 px crop gets a quarter of it, so the same blur."""
    full = TileMultiCrop("hipt")
    assert [v.blur_sigma for v in full.views] == [(0.1, 2.0)] * 10
    small = TileMultiCrop("hipt", global_size=56, local_size=24)
    assert [v.blur_sigma for v in small.views] == [(0.025, 0.5)] * 10
    impulse = torch.zeros(1, 3, 31, 31)
    impulse[..., 15, 15] = 1.0
    for sigma in (1.0, 2.0):  # the blurred impulse's spread along a row is the sigma drawn
        row = augment.random_blur(impulse, 1.0, (sigma, sigma))[0, 0].sum(dim=0)
        spread = (row * (torch.arange(31.0) - 15) ** 2).sum().sqrt()
        assert spread == pytest.approx(sigma, rel=0.02)


# ---------------------------------------------------------------- tile-level crops

def test_resized_crop_is_exact_at_unit_scale_and_mirrors() -> None:
    images = torch.rand(2, 3, 20, 20, generator=_generator())
    boxes = augment.CropBoxes(torch.tensor([3, 0]), torch.tensor([5, 10]), torch.tensor([10, 10]), torch.tensor([10, 10]))
    crops = augment.resized_crop(images, boxes, size=10, flip=torch.tensor([False, True]))
    torch.testing.assert_close(crops[0], images[0, :, 3:13, 5:15], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], images[1, :, 0:10, 10:20].flip(-1), atol=1e-5, rtol=0)


def test_resized_crop_of_whole_image_is_bicubic_resize() -> None:
    images = torch.rand(1, 3, 16, 16, generator=_generator())
    whole = augment.CropBoxes(*(torch.tensor([v]) for v in (0, 0, 16, 16)))
    expected = F.interpolate(images, size=(12, 12), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(augment.resized_crop(images, whole, 12, torch.tensor([False])), expected)


def test_crop_boxes_fit_and_follow_scale_and_ratio() -> None:
    boxes = augment.sample_resized_crop_boxes(500, 64, 64, scale=(0.05, 0.4), generator=_generator())
    assert torch.all(boxes.top >= 0) and torch.all(boxes.top + boxes.height <= 64)
    assert torch.all(boxes.left >= 0) and torch.all(boxes.left + boxes.width <= 64)
    area = (boxes.height * boxes.width).double() / 64**2
    assert area.min() > 0.04 and area.max() < 0.42  # the scale range, up to rounding to whole pixels
    ratio = boxes.width.double() / boxes.height
    assert ratio.min() > 0.7 and ratio.max() < 1.4


def _tiles(n: int = 4, identical: bool = False) -> torch.Tensor:
    tiles = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=_generator(1))
    return tiles[:1].expand(n, -1, -1, -1).contiguous() if identical else tiles


def test_tile_crops_shapes_dtype_and_normalisation() -> None:
    crops = TileMultiCrop("imagenet", global_size=28, local_size=12)(_tiles(), _generator())
    assert [tuple(c.shape) for c in crops] == [(4, 3, 28, 28)] * 2 + [(4, 3, 12, 12)] * 8
    assert all(c.dtype == torch.float32 for c in crops)
    black = normalise(torch.zeros(3, 1, 1), "imagenet").flatten()
    white = normalise(torch.full((3, 1, 1), 255.0), "imagenet").flatten()
    for crop in crops:  # every channel stays within the normalised 0..255 range
        assert torch.all(crop.amin(dim=(0, 2, 3)) >= black - 1e-5)
        assert torch.all(crop.amax(dim=(0, 2, 3)) <= white + 1e-5)
    with pytest.raises(ValueError, match="uint8"):
        TileMultiCrop("imagenet")(_tiles().float())
    with pytest.raises(ValueError, match="normalisation"):
        TileMultiCrop("none")


def test_tile_crops_are_deterministic_under_a_seeded_generator() -> None:
    multicrop = TileMultiCrop("hipt", global_size=28, local_size=12, n_local=2)
    first, again = multicrop(_tiles(), _generator(7)), multicrop(_tiles(), _generator(7))
    other = multicrop(_tiles(), _generator(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_identical_tiles_get_different_crops() -> None:
    crops = TileMultiCrop("hipt", global_size=28, local_size=12, n_local=2)(_tiles(4, identical=True), _generator())
    for crop in crops:
        assert all(not torch.allclose(crop[0], crop[i]) for i in range(1, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tile_crops_run_on_the_input_device_with_the_same_parameters() -> None:
    multicrop = TileMultiCrop("hipt", global_size=28, local_size=12, n_local=2)
    on_cpu = multicrop(_tiles(), _generator(2))
    on_gpu = multicrop(_tiles().cuda(), _generator(2))
    for cpu_crop, gpu_crop in zip(on_cpu, on_gpu):
        assert gpu_crop.is_cuda
        torch.testing.assert_close(gpu_crop.cpu(), cpu_crop, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- region-level crops

def _position_grids(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, 2, 16, 16] grids whose channel 0 holds the row and channel 1 the column of each token."""
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    return torch.stack([rows, cols]).to(dtype).expand(n, -1, -1, -1).contiguous()


def test_region_crops_shapes_and_dtype() -> None:
    grids = torch.randn(3, 384, 16, 16, dtype=torch.float16)
    crops = RegionMultiCrop()(grids, _generator())
    assert [tuple(c.shape) for c in crops] == [(3, 384, 14, 14)] * 2 + [(3, 384, 6, 6)] * 8
    assert all(c.dtype == torch.float16 for c in crops)
    with pytest.raises(ValueError, match="at least 14"):
        RegionMultiCrop()(torch.randn(1, 384, 12, 12))


def test_region_crops_are_windows_flipped_along_columns_and_differ_per_sample() -> None:
    crops = RegionMultiCrop(global_size=14, local_size=6, n_local=8)(_position_grids(8), _generator(3))
    flips = []
    for crop in crops:
        rows, cols = crop[:, 0], crop[:, 1]
        assert torch.all(rows.diff(dim=1) == 1) and torch.all(rows.diff(dim=2) == 0)  # rows never flip
        step = cols.diff(dim=2)
        assert torch.all((step == 1) | (step == -1)) and torch.all(cols.diff(dim=1) == 0)
        flips += (step[:, 0, 0] == -1).tolist()
        origins = {(r, c) for r, c in zip(rows[:, 0, 0].tolist(), cols.amin(dim=(1, 2)).tolist())}
        assert len(origins) > 1  # identical grids, different windows
    assert 0.2 < sum(flips) / len(flips) < 0.8


def test_region_crops_are_deterministic_under_a_seeded_generator() -> None:
    multicrop, grids = RegionMultiCrop(), torch.randn(2, 8, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(multicrop(grids, _generator(5)), multicrop(grids, _generator(5))))
