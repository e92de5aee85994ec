"""Loading carat's configuration tree (:mod:`carat.tree`) from a preset (:mod:`carat.presets`), a TOML file and
command-line overrides; and, the same way, the sections of the commands outside the tree (``[evaluate]``,
``[predict]``, ``[export]``: :func:`load_sections`).

Precedence: the preset's defaults < a TOML file (``--config FILE``) < ``--section.key=value`` overrides.
Every section is a dataclass defined next to the code it configures (``model`` in ``carat.model.config``,
``loader`` in ``carat.data.loader.loader_config`` ...); this module only composes them, parses values against the field
types, and turns every mistake into a :class:`~carat.errors.ConfigError` that names the key and what is
allowed. The resolved tree is written to every run directory as ``config.toml``. The command-line side (the
shared arguments, flags that are shorthands for keys) is :mod:`carat.cli`; the override grammar
(:func:`split_overrides`, :func:`parse_overrides`) is here, since :func:`load_config` takes overrides as text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from carat.errors import ConfigError
from carat.presets import DEFAULT_PRESET, OFFICIAL, PRESET_SOURCES, PRESETS, preset_values  # noqa: F401
from carat.train.train_config import TrainConfig  # noqa: F401  (re-exported: carat.config.TrainConfig)
from carat.tree import SECTIONS, CaratConfig, check_cross_sections  # noqa: F401  (re-exported)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_text(value: Any, parse: Any) -> Any:
    """``parse(value)`` for a command-line string, None when it is not one or does not parse."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        return None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field type ``tp``; ConfigError naming ``key`` if impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        parsed = _parse_text(value, lambda text: int(text.replace("_", "")))
        if parsed is not None:
            return parsed
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        parsed = _parse_text(value, float)
        if parsed is not None:
            return parsed
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


RETIRED_KEYS: dict[str, Any] = {
    "model.modality_dropout": 0.0,
    "model.temporal_conv_kernel": 0,
    "model.label_pooling": "attention",
}
"""Options measured, rejected and removed after 0.1.0 (their figures stay in BENCHMARKS.md, "Learning"), with the
value that meant "off". Run directories and configs written before carry them: that value is accepted with a
deprecation line for one release; any other value names the removal, since such a model cannot be rebuilt."""
_retired_seen: set[str] = set()


def _same_value(value: Any, off: Any) -> bool:
    """``value`` (from TOML, a saved config or a command line's text) means ``off``."""
    if isinstance(off, str):
        return value == off
    try:
        return float(value) == float(off)
    except (TypeError, ValueError):
        return False


def _retired(key: str, value: Any) -> bool:
    """True for a retired key at its "off" value (to be skipped); a ConfigError for any other value."""
    if key not in RETIRED_KEYS:
        return False
    off = RETIRED_KEYS[key]
    if not _same_value(value, off):
        raise ConfigError(f"{key}={value!r}: this option was removed after carat 0.1.0 (measured and rejected: "
                          f"BENCHMARKS.md, Learning); only {off!r}, what it meant by off, is still read")
    if key not in _retired_seen:
        _retired_seen.add(key)
        print(f"carat: {key} was removed after 0.1.0 and is ignored at {off!r}; drop it from the config "
              f"(accepted for one release)", file=sys.stderr)
    return True


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for name, value in values.items():
        if _retired(f"{section}.{name}", value):
            continue
        if name not in names:
            raise ConfigError(f"unknown key {section}.{name}{_suggest(name, names)}")
        kwargs[name] = coerce(value, hints[name], f"{section}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"[{section}] {err}") from None


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, Any], origin: str,
           known: Sequence[str] = SECTIONS) -> None:
    for section, values in extra.items():
        if section not in known:
            raise ConfigError(f"{origin}: unknown section [{section}]{_suggest(section, list(known))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of key = value")
        base.setdefault(section, {}).update(values)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (the rest, the ``--section.key[=value]`` overrides with their values), so that a command with
    positional arguments never takes an override's value for one (``inspect --loader.token_budget 700 DIR``:
    700 belongs to the override, DIR to the command). A value is the next word unless it starts with ``--``."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name:  # a mistyped section too: carat.config then names it
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``["--model.hidden_size=64", "--train.epochs", "3"]`` -> ``{"model": {...}, "train": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value: --section.key=value")
            i += 1
            value = args[i]
        section, _, key = name.partition(".")
        if not key:
            raise ConfigError(f"override {arg!r} must name section.key")
        out.setdefault(section, {})[key] = value
        i += 1
    return out


def read_config_file(file: str | Path) -> dict[str, Any]:
    """A ``--config`` TOML file as a dict; ConfigError naming the file when it is missing or not TOML."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def load_config(
    preset: str = "seed", file: str | Path | None = None, overrides: list[str] | None = None
) -> CaratConfig:
    """Resolve a preset, an optional TOML file and ``--section.key=value`` overrides into a CaratConfig."""
    values: dict[str, dict[str, Any]] = {}
    if file is not None:
        data = read_config_file(file)
        preset = str(data.pop("preset", preset))
        _merge(values, data, str(file))
    merged = preset_values(preset)
    for section, section_values in values.items():
        merged.setdefault(section, {}).update(section_values)
    _merge(merged, parse_overrides(list(overrides or [])), "command line")
    built = {}
    for section in SECTIONS:
        cls = next(f for f in fields(CaratConfig) if f.name == section).default_factory
        built[section] = _build_section(section, cls, merged.get(section, {}))
    return CaratConfig(preset=preset, **built)


def load_sections(classes: Mapping[str, type], file: str | Path | None = None,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """Sections outside the training tree (a command's own, such as ``{"evaluate": EvaluateConfig}``): their
    defaults < a TOML file < ``--section.key=value`` overrides, checked as the tree is (unknown keys and sections
    named with a suggestion, values parsed against the field types). The file holds only these sections."""
    values: dict[str, dict[str, Any]] = {}
    if file is not None:
        _merge(values, read_config_file(file), str(file), known=list(classes))
    _merge(values, parse_overrides(list(overrides or [])), "command line", known=list(classes))
    return {section: _build_section(section, cls, values.get(section, {})) for section, cls in classes.items()}


def config_to_dict(cfg: CaratConfig) -> dict[str, Any]:
    """A plain, JSON/TOML-friendly dict of the resolved config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _toml_value(value: Any) -> str:
    if value is None:  # TOML has no null; coerce() reads "none" back as None (also inside lists)
        return '"none"'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(cfg: CaratConfig) -> str:
    """The resolved config as TOML that ``load_config(file=...)`` reads back (TOML has no null: None is "none")."""
    data = config_to_dict(cfg)
    lines = [f"preset = {_toml_value(data.pop('preset'))}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value('none' if v is None else v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (litgpt style), read from its source; a section that
    extends another (:mod:`carat.inference_config`) inherits the docs of the fields it inherits."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): documented keys are a nicety, not a need
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_config(cfg: CaratConfig, sections: Sequence[str] | None = None) -> str:
    """The resolved config as commented TOML: every key, its value, and what it means; under a preset with
    sources (``official``), also where the preset's value comes from and whether this config overrides it.
    ``sections``: only those tables, after the preset line (what ``python -m carat.data synth`` reads); TOML that
    ``--config`` reads back either way."""
    data = config_to_dict(cfg)
    sources = PRESET_SOURCES.get(cfg.preset, {})
    preset = json.loads(json.dumps(config_to_dict(PRESETS[cfg.preset]()))) if sources else {}
    lines = [f"preset = {_toml_value(data.pop('preset'))}"]
    for section, values in data.items():
        if sections is None or section in sections:
            lines += _describe_table(section, type(getattr(cfg, section)), values, sources, cfg.preset,
                                     preset.get(section, {}))
    return "\n".join(lines) + "\n"


def describe_sections(sections: Mapping[str, Any]) -> str:
    """Resolved sections outside the tree (a command's own, from :func:`load_sections`) as commented TOML."""
    lines: list[str] = []
    for section, value in sections.items():
        values = json.loads(json.dumps(dataclasses.asdict(value)))
        lines += _describe_table(section, type(value), values, {}, "", {})
    return "\n".join(lines).lstrip("\n") + "\n"


def _describe_table(section: str, cls: type, values: dict[str, Any], sources: Mapping[str, str], preset_name: str,
                    preset_values: Mapping[str, Any]) -> list[str]:
    """One ``[section]`` table: each key's docstring as comments (and its source in the preset), then the key."""
    import textwrap

    docs = field_docs(cls)
    lines = [f"\n[{section}]"]
    for key, value in values.items():
        for doc_line in textwrap.wrap(docs.get(key, ""), 100):
            lines.append(f"# {doc_line}")
        source = sources.get(f"{section}.{key}")
        if source is not None:
            expected = preset_values[key]
            note = "" if value == expected else f" [overridden here; the preset's value: {_toml_value(expected)}]"
            for doc_line in textwrap.wrap(f"{preset_name}: {source}{note}", 100):
                lines.append(f"# {doc_line}")
        lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
    return lines


def config_from_dict(data: dict[str, Any]) -> CaratConfig:
    """Rebuild a CaratConfig from :func:`config_to_dict` output (a checkpoint's saved config)."""
    data = dict(data)
    preset = data.pop("preset", "seed")
    built = {}
    for section in SECTIONS:
        cls = next(f for f in fields(CaratConfig) if f.name == section).default_factory
        built[section] = _build_section(section, cls, data.get(section, {}))
    return CaratConfig(preset=preset, **built)
