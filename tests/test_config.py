"""Config resolution: defaults <- YAML file <- key=value overrides, with YAML 1.2 numbers."""
from __future__ import annotations

import pytest

from hipt_e2e.config import load_yaml, resolve_config

DEFAULTS = {"out": None, "optim": {"lr": 2e-4, "epochs": 20}, "shard_bytes": 1e9}


def test_scalars_like_yaml_1_2():
    assert load_yaml("1e-3") == 0.001 and load_yaml("1.0e9") == 1e9 and load_yaml("-2E+4") == -2e4
    assert load_yaml("3") == 3 and load_yaml("1.2.3") == "1.2.3" and load_yaml("[1e-3, a]") == [0.001, "a"]
    assert load_yaml("no") == "no" and load_yaml("on") == "on" and load_yaml("true") is True
    assert load_yaml("False") is False and load_yaml("null") is None


def test_file_then_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 1.0e-3\nshard_bytes: 2.0e9\n")
    cfg = resolve_config(DEFAULTS, config, ["optim.epochs=5", "out=runs/x"])
    assert cfg == {"out": "runs/x", "optim": {"lr": 1e-3, "epochs": 5}, "shard_bytes": 2e9}
    assert DEFAULTS["optim"]["epochs"] == 20  # defaults are not modified


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(KeyError, match="optim.lrr"):
        resolve_config(DEFAULTS, None, ["optim.lrr=1"])
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(KeyError, match="optim.epoch"):
        resolve_config(DEFAULTS, config)
