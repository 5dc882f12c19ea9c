"""``--config FILE.yaml``: flag values read from a YAML file, below the command line.

The file is a mapping whose keys are flag names, spelled as on the command line without the
dashes (``max-model-len``) or with underscores (``max_model_len``), and whose values are what the
command line would take: a bool for an on/off flag, a list for a flag of several values, a scalar
otherwise. The values become the parser's defaults, so a flag given on the command line wins.
Every value goes through the flag's own type and choices, exactly as if it had been typed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """The file cannot be used; the message is one line that names the file."""


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="Read flags from a YAML file (keys are flag names, e.g. max-model-len: 4096); "
        "flags given on the command line win over the file.",
    )


def read_config(path: str) -> dict[str, Any]:
    """The file's top-level mapping (empty for an empty file)."""
    import yaml  # only a command that reads a config file pays for the import

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"cannot read config file {path}: {reason}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigFileError(f"config file {path} is not valid YAML{at}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"config file {path} must map flag names to values, not be a {type(data).__name__}"
        )
    return data


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """{dest: value} for every key of the file, converted and checked by the parser's actions."""
    data = read_config(path)
    options = parser._option_string_actions  # option string -> action, argparse's own table
    seen: dict[str, str] = {}  # dest -> the key that set it
    values: dict[str, Any] = {}
    tokens: list[str] = []
    valued: list[str] = []  # dests set through tokens
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigFileError(f"config file {path}: key {key!r} is not a flag name")
        option = "--" + key.replace("_", "-")
        action = options.get(option)
        if action is None or option == "--config":
            raise ConfigFileError(f"config file {path}: {key!r} is not a flag of {parser.prog}")
        if action.dest in seen:
            raise ConfigFileError(f"config file {path}: {key!r} and {seen[action.dest]!r} set the same flag")
        seen[action.dest] = key
        if value is None:
            raise ConfigFileError(f"config file {path}: {key!r} has no value")
        if action.nargs == 0:
            values[action.dest] = _switch_value(path, key, action, value)
        else:
            tokens += _value_tokens(path, key, option, action, value)
            valued.append(action.dest)
    if tokens:
        values.update(_parse_tokens(parser, path, tokens, valued))
    return values


def _switch_value(path: str, key: str, action: argparse.Action, value: Any) -> bool:
    """The dest value of an on/off flag (store_true, store_false, --flag/--no-flag)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        on = True
    elif isinstance(action.const, bool):
        on = action.const
    else:
        raise ConfigFileError(f"config file {path}: {key!r} cannot be set from a config file")
    if not isinstance(value, bool):
        raise ConfigFileError(f"config file {path}: {key!r} is an on/off flag and takes true or false")
    return value if on else not value


def _value_tokens(path: str, key: str, option: str, action: argparse.Action, value: Any) -> list[str]:
    """Command-line tokens that give ``option`` the file's value."""
    if isinstance(value, dict):
        raise ConfigFileError(f"config file {path}: {key!r} takes a value, not a mapping")
    several = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(value, list):
        if not several:
            raise ConfigFileError(f"config file {path}: {key!r} takes one value, not a list")
        return [option, *(_scalar(path, key, item) for item in value)]
    if several:
        return [option, _scalar(path, key, value)]
    # --flag=value: a value that starts with a dash stays a value.
    return [f"{option}={_scalar(path, key, value)}"]


def _scalar(path: str, key: str, value: Any) -> str:
    if isinstance(value, dict | list):
        raise ConfigFileError(f"config file {path}: {key!r} has a nested value")
    return str(value)


def _parse_tokens(
    parser: argparse.ArgumentParser, path: str, tokens: list[str], dests: Collection[str]
) -> dict[str, Any]:
    exit_on_error = parser.exit_on_error
    parser.exit_on_error = False  # a bad value raises here instead of exiting with a usage text
    try:
        namespace, extra = parser.parse_known_args(tokens, argparse.Namespace())
    except argparse.ArgumentError as exc:
        raise ConfigFileError(f"config file {path}: {exc}") from exc
    finally:
        parser.exit_on_error = exit_on_error
    if extra:
        raise ConfigFileError(f"config file {path}: cannot use the value(s) {' '.join(extra)}")
    return {dest: getattr(namespace, dest) for dest in dests}


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str], held: Collection[str] = ()
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse ``argv``; where it names a --config file, the file's values become defaults under the
    command line. Dests in ``held`` are returned to the caller instead of becoming defaults (for
    a value that also has a positional spelling). A file that cannot be used is a one-line error
    and exit code 2, as argparse's own errors."""
    args = parser.parse_args(list(argv))
    if args.config is None:
        return args, {}
    try:
        values = config_defaults(parser, args.config)
    except ConfigFileError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    kept = {dest: values.pop(dest) for dest in held if dest in values}
    parser.set_defaults(**values)
    return parser.parse_args(list(argv)), kept
