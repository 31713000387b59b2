"""Slide encoders (hipt_e2e.models.slide_encoders): each entry against its authors' code (outputs of their
implementation on random weights, stored by tests/fixtures/slide_encoders/make_<name>.py), loaded through
load_slide_encoder from the authors' key names; embed_slides on imported features, then the linear probe and
train_fc on the slide embeddings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hipt_e2e.models.checkpoint import CheckpointError
from hipt_e2e.models.slide_encoders import SLIDE_ENCODERS, load_slide_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "slide_encoders"
# both sides compute each output in float32 as sums over the 37 tiles and the input width, in another order:
# 64 ulps of the output's scale bounds that reordering (measured: 0, the same order here)
TOLERANCE = 64 * torch.finfo(torch.float32).eps
SMALL = {"feather": {"in_dim": 32, "hidden": 16, "attention": 8},  # as make_<name>.py built the authors' model
         "chief": {"in_dim": 384, "hidden": 256, "attention": 256}}


def authors_fixture(name: str, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The authors' random state dict as a weights file under their key names, the input, their output."""
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    weights = tmp_path / f"{name}.safetensors"
    save_file({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}, weights)
    return weights, tensors["input"], tensors["output"]


@pytest.mark.parametrize("name", ["feather", "chief"])
def test_each_slide_encoder_gives_its_authors_embedding(name, tmp_path):
    weights, features, expected = authors_fixture(name, tmp_path)
    model, record = load_slide_encoder(name, weights, **SMALL[name])
    with torch.no_grad():
        embedding = model(features, None, None)
    scale = expected.abs().max().item()
    assert embedding.shape == expected.shape and scale > 0.1
    assert (embedding - expected).abs().max().item() <= TOLERANCE * scale
    assert record["path"] == str(weights.resolve()) and len(record["sha256"]) == 64


def test_feather_uni2_is_feather_over_uni2_h_features():
    uni2, conch = SLIDE_ENCODERS["feather_uni_v2"], SLIDE_ENCODERS["feather"]
    assert (uni2.tile_encoder, uni2.in_dim, uni2.width) == ("uni_v2", 1536, 512)
    assert (conch.tile_encoder, conch.in_dim, conch.width) == ("conch_v15", 768, 512)
    assert SLIDE_ENCODERS["chief"].tile_encoder == "ctranspath"
    for entry in SLIDE_ENCODERS.values():
        assert entry.build()(torch.randn(3, entry.in_dim)).shape == (entry.width,)


def test_a_file_missing_a_used_tensor_or_holding_a_foreign_one_is_refused(tmp_path):
    weights, _, _ = authors_fixture("chief", tmp_path)
    with safe_open(weights, "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    save_file({k: v for k, v in state.items() if k != "attention_net.3.attention_c.weight"}, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.safetensors does not fit slide encoder chief.*attention_c"):
        load_slide_encoder("chief", tmp_path / "missing.safetensors", **SMALL["chief"])
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra.safetensors does not fit slide encoder chief.*extra"):
        load_slide_encoder("chief", tmp_path / "extra.safetensors", **SMALL["chief"])
