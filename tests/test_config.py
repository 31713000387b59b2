"""Config resolution: defaults <- YAML file <- key=value overrides, with YAML 1.2 numbers; typed settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from hipt_e2e.config import Settings, bound, load_yaml, resolve_config, resolve_settings, save_config, section
from hipt_e2e.errors import SettingError, UnknownSettingError

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


@dataclass(frozen=True)
class Optim(Settings):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = bound(5e-4, 0.0)
    scale: tuple[float, ...] = (0.4, 1.0)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Run(Settings):
    out: str | None = None
    epochs: int = bound(10, 1)
    precision: Literal["no", "fp16", "bf16"] | None = None  # the order of runtime.Precision: typing caches equal Literals
    optim: Optim = section(Optim)


def test_typed_settings_resolve_once_with_types_and_sections(tmp_path):
    (tmp_path / "run.yaml").write_text("optim:\n  lr: 1\n  scale: [0.5, 1]\n")
    run = resolve_settings(Run, tmp_path / "run.yaml", ["epochs=3", "optim.extra.beta=2", "precision=no"])
    assert run == Run(epochs=3, precision="no", optim=Optim(lr=1.0, scale=(0.5, 1.0), extra={"beta": 2}))
    assert isinstance(run.optim.lr, float)  # an int where a float is asked for is that float
    assert run.to_mapping() == {"out": None, "epochs": 3, "precision": "no",
                                "optim": {"name": "adamw", "lr": 1.0, "scale": [0.5, 1.0], "extra": {"beta": 2}}}
    assert Run.from_mapping(run.to_mapping()) == run  # what config.yaml holds reads back as the same settings
    assert run.with_changes(**{"optim.name": "sgd"}).optim.name == "sgd" and run.optim.name == "adamw"
    saved = save_config(run, tmp_path)
    assert resolve_settings(Run, saved) == run


@pytest.mark.parametrize(("override", "message"), [
    ("epochs=0", "epochs: must be >= 1, got 0"),
    ("epochs=1.5", "epochs: expected int, got 1.5"),
    ("epochs=true", "epochs: expected int, got True"),
    ("optim.name=lamb", "optim.name: choose one of ['adamw', 'sgd'], got 'lamb'"),
    ("optim.lr=-1", "optim.lr: must be >= 0.0, got -1.0"),
    ("optim.scale=3", "optim.scale: expected a list, got 3"),
    ("optim.scale=[1, x]", "optim.scale[1]: expected float, got 'x'"),
    ("precision=bf17", "precision: choose one of ['no', 'fp16', 'bf16'], got 'bf17'"),
    ("optim=3", "optim: expected a section (a mapping), got 3"),
])
def test_typed_settings_refuse_a_bad_value_naming_its_key(override, message):
    with pytest.raises(SettingError) as error:
        resolve_settings(Run, overrides=[override])
    assert str(error.value) == message


def test_typed_settings_refuse_an_unknown_key_naming_it():
    with pytest.raises(UnknownSettingError, match="'optim.lrr'"):
        resolve_settings(Run, overrides=["optim.lrr=1"])
    with pytest.raises(UnknownSettingError, match="'optim.lrr'"):
        Run.from_mapping({"optim": {"lrr": 1}})


def test_a_run_saved_before_a_setting_existed_resumes_while_it_has_its_default(tmp_path) -> None:
    from hipt_e2e.training.checkpointing import resume_state, save_checkpoint
    from hipt_e2e.training.e2e import E2ESettings

    run = E2ESettings(out=str(tmp_path), resume=True)
    older = run.to_mapping()
    del older["level"]  # written by a version without `level`
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": older, "step": 3})
    assert resume_state(run, tmp_path / "checkpoint.pt")["step"] == 3
    with pytest.raises(SettingError, match=r"differ from the saved run in \['level'\]"):
        resume_state(run.with_changes(level="patient"), tmp_path / "checkpoint.pt")
    with pytest.raises(SettingError, match=r"in \['optim.lr.slide'\]"):
        resume_state(run.with_changes(**{"optim.lr.slide": 1.0}), tmp_path / "checkpoint.pt")
