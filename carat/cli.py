"""The command line every carat command shares: ``train``, ``tune``, ``data``, ``evaluate``, ``predict``, ``export``.

Each command reads typed config sections, the training tree's (:mod:`carat.tree`) or its own (``[evaluate]``,
``[predict]``, ``[export]``), from one precedence chain: the defaults (a preset, for the tree) < ``--config
FILE.toml`` < the command's flags < ``--section.key=value``. What the commands share on the command line is here:

- :func:`add_config_arguments`: ``--config``, ``--show-config`` and, for the tree, ``--preset``;
- :class:`Alias`: a flag that is shorthand for one config key, its type, choices and help read off the field.
  A documented shorthand (``--checkpoint``, ``--scale``) stays; a deprecated one still works for one release and
  prints a line naming the ``--section.key=value`` that replaces it (the README's changelog lists them);
- :func:`parse_command_line`: argparse for the flags; the overrides go to :mod:`carat.config`, which names an
  unknown key or section and suggests the closest one; an unknown flag stays argparse's usage error (status 2),
  with a suggestion too.

The override grammar and the loading are :mod:`carat.config`'s. Importing this module loads no torch.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from carat.config import CaratConfig, load_config, load_sections, split_overrides
from carat.presets import DEFAULT_PRESET, PRESETS


@dataclass(frozen=True)
class Alias:
    """A flag that sets one config key; unset, the config's value stands."""

    flag: str
    """The command-line flag, e.g. ``--length-scale``."""
    key: str
    """The ``section.key`` it sets, e.g. ``synth.length_scale``."""
    help: str | None = None
    """What the value means; None: the field's own docstring. The help appends the key and its default."""
    const: Any = None
    """For a flag that takes no value (``--trust-pickle``): the value it sets."""
    to_config: Callable[[float], Any] | None = None
    """A float flag value -> the config value, where the units differ (``--shard-max-mb``: MiB -> bytes)."""
    show_default: Callable[[Any], str] | None = None
    """How the help writes the key's default (None: as the config file does)."""
    deprecated: bool = False
    """Kept for one release: using it prints a line naming the ``--section.key=value`` to use instead."""

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def override(self, value: Any) -> str:
        """The ``--section.key=value`` that this flag's value stands for."""
        return f"--{self.key}={self.to_config(value) if self.to_config is not None else value}"


def _toml_word(value: Any) -> str:
    """A default as the config file writes it: true, "float16", none."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _alias_kwargs(alias: Alias, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """argparse options for an alias, read off its config field: type or choices, help, the default in the help."""
    from carat.config import field_docs

    section, key = alias.key.split(".", 1)
    owner = defaults[section]
    default = getattr(owner, key)
    what = alias.help if alias.help is not None else field_docs(type(owner)).get(key, "")
    what = what.replace("%", "%%")  # argparse formats help strings with %
    if alias.deprecated:
        what = f"DEPRECATED, use --{alias.key}=VALUE: {what}"
    kwargs: dict[str, Any] = {"dest": alias.dest, "default": None}  # None: the flag was not given
    if alias.const is not None:
        return {**kwargs, "action": "store_const", "const": alias.const,
                "help": f"{what} (sets [{section}] {key} = {_toml_word(alias.const)}; "
                        f"default {_toml_word(default)})"}
    tp = typing.get_type_hints(type(owner))[key]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | None`: the flag gives the int
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        kwargs["choices"] = typing.get_args(tp)
    else:
        kwargs["type"] = float if alias.to_config is not None else tp
    shown = (alias.show_default or _toml_word)(default)
    kwargs["help"] = f"{what} (default: [{section}] {key} = {shown})"
    return kwargs


def add_aliases(group: Any, aliases: Sequence[Alias], defaults: Mapping[str, Any]) -> None:
    """The ``aliases`` as flags of ``group`` (a parser, an argument group, a mutually exclusive group);
    ``defaults``: each section's default value, for the help (``{"evaluate": EvaluateConfig()}``)."""
    for alias in aliases:
        group.add_argument(alias.flag, **_alias_kwargs(alias, defaults))


def tree_defaults(cfg: CaratConfig) -> dict[str, Any]:
    """The sections of a training tree, as :func:`add_aliases` takes them."""
    from carat.tree import SECTIONS

    return {section: getattr(cfg, section) for section in SECTIONS}


def alias_overrides(args: argparse.Namespace, aliases: Sequence[Alias]) -> list[str]:
    """The ``--section.key=value`` overrides the flags given stand for, in the order of ``aliases``; a deprecated
    flag prints one line naming its replacement."""
    overrides = []
    for alias in aliases:
        value = getattr(args, alias.dest, None)
        if value is None:
            continue
        overrides.append(alias.override(value))
        if alias.deprecated:
            print(f"carat: {alias.flag} is deprecated and will be removed in the next release; use "
                  f"{overrides[-1]} instead", file=sys.stderr)
    return overrides


def add_config_arguments(parser: Any, file_help: str, show_help: str, preset_help: str | None = None) -> None:
    """--config, --show-config and, where the command reads the training tree (``preset_help``), --preset on
    ``parser`` (a parser or an argument group), with the command's own help texts."""
    parser.add_argument("--config", type=Path, help=file_help)
    if preset_help is not None:
        parser.add_argument("--preset", choices=PRESETS, help=preset_help)
    parser.add_argument("--show-config", action="store_true", help=show_help)


def reject_unknown_flags(parser: argparse.ArgumentParser, extras: Sequence[str], takes_overrides: bool) -> None:
    """argparse's exit status 2 for what is neither a flag of the command nor (where it ``takes_overrides``) a
    ``--section.key[=value]`` override: those are left to carat.config, which names an unknown key and suggests
    one."""
    wants_value = False  # the previous extra was `--section.key` without `=value`
    for arg in extras:
        name = arg.split("=", 1)[0]
        if wants_value:
            wants_value = False
        elif takes_overrides and name.startswith("--") and "." in name:
            wants_value = "=" not in arg
        else:
            known = [s for action in parser._actions for s in action.option_strings]
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {close[0]}?)" if close
                                                                           else ""))


def parse_command_line(parser: argparse.ArgumentParser,
                       argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the flags, the ``--section.key=value`` overrides) of a command line; an unknown flag is argparse's error.
    The overrides are split off first, so that a positional argument never takes an override's value. A command
    with subcommands (``carat.data``) sets two defaults on each subparser: ``command_parser`` (the subparser,
    which reports the error with its own usage) and ``sections`` (the sections it reads; none: no overrides)."""
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(rest)
    extras = unknown + overrides
    reject_unknown_flags(getattr(args, "command_parser", parser), extras,
                         takes_overrides=bool(getattr(args, "sections", True)))
    return args, extras


# ---------------------------------------------------------------------------- commands on the training tree
def config_parser(prog: str, doc: str | None, sections: str, file_help: str) -> argparse.ArgumentParser:
    """The parser of a command that reads the whole training tree (carat.train, carat.tune): --config, --preset,
    --show-config; any other --section.key=value is left to :func:`cli_config` as an override."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any config value: --section.key=value (sections: {sections}). "
               "Precedence: preset < --config file < flags < overrides.",
    )
    add_config_arguments(parser, file_help,
                         preset_help="defaults to start from (default: tiny without --config, else the file's "
                                     "preset or seed)",
                         show_help="print the resolved configuration, every key documented, and exit")
    return parser


def cli_config(args: argparse.Namespace, overrides: list[str]) -> CaratConfig:
    """The config a command line names: :data:`carat.presets.DEFAULT_PRESET` without --config (the quickstart),
    else the file's own preset (or seed) unless --preset says otherwise; then the overrides."""
    if args.config is not None and args.preset is None:
        return load_config(file=args.config, overrides=overrides)
    return load_config(preset=args.preset or DEFAULT_PRESET, file=args.config, overrides=overrides)


# ---------------------------------------------------------------------------- commands with a section of their own
def section_parser(prog: str, doc: str | None, section: str) -> argparse.ArgumentParser:
    """The parser of a command configured by a section of its own (``[evaluate]``): --config, --show-config; the
    command adds its flags as :class:`Alias` es of the section's keys."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any key of [{section}]: --{section}.KEY=VALUE (--show-config lists them). Precedence: defaults < "
               f"--config file < flags < --{section}.KEY=VALUE.")
    add_config_arguments(parser.add_argument_group("configuration"),
                         file_help=f"TOML file whose [{section}] table sets any of these keys",
                         show_help=f"print the resolved [{section}], every key documented, and exit")
    return parser


def resolve_section(parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str, cls: type,
                    aliases: Sequence[Alias]) -> tuple[argparse.Namespace, Any]:
    """A command's flags and its resolved ``[section]``: ``cls``'s defaults < --config < flags < overrides.
    Usage errors exit with status 2 (argparse); a bad key or value raises ConfigError naming it."""
    args, overrides = parse_command_line(parser, argv)
    return args, load_sections({section: cls}, args.config, alias_overrides(args, aliases) + overrides)[section]


def require(parser: argparse.ArgumentParser, resolved: Any, aliases: Sequence[Alias], keys: Sequence[str]) -> None:
    """argparse's message and exit status 2 for ``keys`` of ``resolved`` that neither the command line nor the
    --config file set (checked after --show-config, which needs none of them)."""
    by_key = {alias.key.split(".", 1)[1]: alias for alias in aliases}
    missing = [by_key[key] for key in keys if getattr(resolved, key) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(a.flag for a in missing)} (or "
                     f"{', '.join(a.key for a in missing)} in the --config file)")
