"""Settings: defaults <- `--config FILE` <- `a.b=value` overrides, resolved once at the entry point into typed
`Settings` dataclasses (sections are Settings fields, choices `Literal[...]`, bounds `bound(default, low,
high)`), validated with errors naming the dotted key, and written next to every run's outputs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

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
    """YAML 1.2 numbers and booleans: PyYAML (YAML 1.1) reads 1e-3 as a string and `no` as False."""


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
    """The dotted keys whose default is {}: mappings of free keys (data.storage_options.endpoint_url=URL)."""
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


def save_config(cfg: Mapping | Settings, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to the outputs (atomically)."""
    path = Path(out_dir) / name
    values = cfg.to_mapping() if isinstance(cfg, Settings) else dict(cfg)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ typed settings
S = TypeVar("S", bound="Settings")


def bound(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A numeric setting with inclusive bounds (None: open), checked by Settings.from_mapping."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high)})


def section(kind: type[S]) -> Any:
    """A field holding a sub-section with its own defaults."""
    return dataclasses.field(default_factory=kind)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _checked(kind: Any, value: Any, key: str) -> Any:
    """`value` as a setting of type `kind` (ints as floats, lists as tuples), or a SettingError naming `key`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked(option, value, key)
            except SettingError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else SettingError(
            f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise SettingError(f"{key}: choose one of {list(args)}, got {value!r}")
        return value
    if isinstance(kind, type) and issubclass(kind, Settings):
        if not isinstance(value, Mapping):
            raise SettingError(f"{key}: expected a section (a mapping), got {value!r}")
        return kind.from_mapping(value, f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SettingError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_checked(item, v, f"{key}[{n}]") for n, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise SettingError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, bool) or not isinstance(value, kind):
        raise SettingError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _in_bounds(field: dataclasses.Field, value: Any, key: str) -> None:
    low, high = field.metadata.get("bounds", (None, None))
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        span = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise SettingError(f"{key}: must be {span}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every typed settings section (see the module docstring)."""

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], prefix: str = "") -> S:
        """A validated instance from YAML-like values; missing keys keep their defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UnknownSettingError(f"unknown setting {prefix + unknown[0]!r}; known keys here: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        checked = {}
        for name, value in values.items():
            checked[name] = _checked(hints[name], value, prefix + name)
            _in_bounds(fields[name], checked[name], prefix + name)
        return cls(**checked)

    def to_mapping(self) -> dict[str, Any]:
        """Plain YAML-ready values (sections as mappings, tuples as lists), in field order."""
        def plain(value: Any) -> Any:
            if isinstance(value, Settings):
                return value.to_mapping()
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return copy.deepcopy(value)

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def with_changes(self: S, **dotted: Any) -> S:
        """A copy with dotted changes (`**{"model.freeze_tile": True}`), validated as the user's would be."""
        return resolve_settings(type(self), base=self, changes=dotted)


def resolve_settings(kind: type[S], config_file: str | Path | None = None, overrides: Sequence[str] = (), *,
                     base: Settings | None = None, changes: Mapping[str, Any] | None = None) -> S:
    """Defaults (or `base`) <- YAML file <- `key=value` overrides <- `changes`, validated into `kind`."""
    defaults = (base or kind()).to_mapping()
    values = resolve_config(defaults, config_file, overrides)
    free_form = _free_form(defaults)
    for key, value in (changes or {}).items():
        _set_dotted(values, key, value, allow_new=any(key.startswith(f"{path}.") for path in free_form))
    return kind.from_mapping(values)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (they hold examples); every optional argument's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if action.required or not optional or action.default is argparse.SUPPRESS or "default:" in text:
            return action.help
        shown = "none" if action.default in (None, []) else "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "out=DIR") -> None:
    """`--config FILE` and trailing `key=value` overrides (`example`: one that fits the command)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings over the built-in defaults (default: none)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help=f"dotted settings over the defaults and --config, e.g. {example}")


def setup_logging(level: int | str = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
