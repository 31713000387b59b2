"""Config in, artefacts out: YAML files plus dotted `key=value` overrides, and logging setup.

Every recipe and CLI resolves its settings the same way: built-in defaults <- `--config FILE` <- command
line flags <- `a.b=value` overrides, and writes the resolved result next to its outputs so that every
artefact says exactly how it was made.
"""
from __future__ import annotations

import argparse
import copy
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hipt_e2e.errors import SettingError, UnknownSettingError
from hipt_e2e.io import atomic_write_text


def _set_dotted(cfg: dict, dotted: str, value: Any, *, allow_new: bool) -> None:
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            if not allow_new:
                raise UnknownSettingError(f"unknown config key {dotted!r} (no section {key!r})")
            node[key] = {}
        node = node[key]
    if not allow_new and keys[-1] not in node:
        raise UnknownSettingError(f"unknown config key {dotted!r}; known keys here: {sorted(node)}")
    node[keys[-1]] = value


def _merge(base: dict, update: Mapping, prefix: str = "") -> None:
    for key, value in update.items():
        if key not in base:
            raise UnknownSettingError(f"unknown config key {prefix + key!r}; known keys: {sorted(base)}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, Mapping):  # {}: free-form (timm_kwargs)
            _merge(base[key], value, prefix + key + ".")
        else:
            base[key] = value


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers and booleans: PyYAML (YAML 1.1) reads 1e-3 and 1.0e9 as strings, which a learning
    rate or a byte count must never be, and yes/no/on/off as booleans, so `mixed_precision=no` would
    arrive as False."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str = "") -> Any:
    """YAML 1.2 scalars (see _Loader); a syntax error names `where` the text came from."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SettingError(f"{where or repr(text)}: not valid YAML ({' '.join(str(exc).split())})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so numbers, booleans and lists work."""
    if "=" not in text:
        raise SettingError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), load_yaml(raw, f"override {text!r}") if raw != "" else None


def _free_form(defaults: Mapping, prefix: str = "") -> list[str]:
    """The dotted keys whose default is {}: mappings of free keys (model.timm_kwargs, data.storage_options),
    so `data.storage_options.endpoint_url=URL` may add a key there."""
    found = []
    for key, value in defaults.items():
        if isinstance(value, Mapping):
            found += _free_form(value, f"{prefix}{key}.") if value else [prefix + key]
    return found


def resolve_config(defaults: Mapping, config_file: str | Path | None = None,
                   overrides: Sequence[str] = ()) -> dict:
    """Defaults <- YAML file <- overrides. Unknown keys are errors: a typo must not pass silently."""
    cfg = copy.deepcopy(dict(defaults))
    if config_file is not None:
        loaded = load_yaml(Path(config_file).read_text(), str(config_file)) or {}
        if not isinstance(loaded, Mapping):
            raise SettingError(f"{config_file}: a config file must hold a mapping, got {type(loaded).__name__}")
        _merge(cfg, loaded)
    free_form = _free_form(defaults)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(cfg, key, value, allow_new=any(key.startswith(f"{path}.") for path in free_form))
    return cfg


def save_config(cfg: Mapping, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to the outputs (atomically)."""
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` of every command: descriptions as written (they hold examples), and every optional
    argument's default after its help, unless the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if action.required or not optional or action.default is argparse.SUPPRESS or "default:" in text:
            return action.help
        shown = "none" if action.default in (None, []) else "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "out=DIR") -> None:
    """`--config FILE` and trailing `key=value` overrides, shared by every entry point; `example` is an
    override that fits the command."""
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings over the built-in defaults (default: none)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help=f"dotted settings over the defaults and --config, e.g. {example}")


def setup_logging(level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
