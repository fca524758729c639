"""One command-line convention for every script: typed dataclass fields are the options, YAML files the presets.

    python train.py --config configs/tiny.yaml --max_steps 40 --shuffle false
    python data_prep.py --dataset my.txt --output-dir data/mine        # --a_b and --a-b are the same option
    python evaluate_gpt2.py --config my_eval.yaml --hellaswag_limit 100

A config is a dataclass, declared once with its types, defaults and help (`opt(default, help)`); it is either
flat (data_prep.py, evaluate_gpt2.py) or made of sections that are themselves dataclasses (train.py: `model:`,
`data:`, ...). The command line has one `--<field>` per field (names are unique across sections), parsed by the
field's type: numbers accept `5e5` and `524_288`, booleans `true/false` (a bare `--flag` means true), optional
values `none`. `--config FILE` reads a YAML preset first (nested by section for sectioned configs); options given
on the command line override it. Unknown keys and options are refused with a "did you mean" hint, values of the
wrong type with the expected type; then the config's own `validate()` runs, if it has one.

argparse comes from the standard library; transformers' HfArgumentParser has no YAML presets for nested configs,
no "did you mean" and another boolean convention, which is why this small layer exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import traceback
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import EXPECTED, ConfigError, Stop, describe_environment_error

DEBUG_ENV = "GPT2_REPRO_DEBUG"  # =1: tracebacks for expected errors too (like --debug)


def opt(default: Any = dataclasses.MISSING, help: str = "", aliases: tuple[str, ...] = (), auto: bool = False):
    """A dataclass field with the help text of its option. No default: the option is required. `aliases`: other
    names of the same option (an old spelling, the name another script or tool uses, e.g. Trainer's `report_to`),
    accepted on the command line and in YAML presets and shown in --help. `auto`: the field is optional and `auto`
    is a spelling of its unset value (None: chosen for you), as its help says."""
    return field(default=default, metadata={"help": help, "aliases": tuple(aliases), "auto": auto})


UNSET_WORDS = ("none", "null", "")  # what leaves an optional value unset; "auto" too where a field takes it
INT64_MAX = 2**63 - 1  # what numpy and torch hold: an integer option beyond it cannot mean what it says


# ----------------------------------------------------------------------------------------------- types


def _base_type(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X`, `X | None` and `Optional[X]`."""
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    if not optional:
        return tp, False
    return next(a for a in typing.get_args(tp) if a is not type(None)), True


def _type_name(tp, auto: bool = False) -> str:
    base, optional = _base_type(tp)
    if typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(base)))
    else:
        name = base.__name__
    return (f"{name}, null or auto" if auto else f"{name} or null") if optional else name


def _parse_text(text: str, base, tp, where: str):
    """A command-line string as a value of type `base`."""
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        if base is int:
            return _parse_int(text.replace("_", ""))  # accepts 5e5 and 524_288
        return base(text.replace("_", "") if base is float else text)
    except ValueError:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {text!r}") from None


def _parse_int(text: str) -> int:
    """An integer written as one (`524288`) or in scientific notation (`5e5`), exactly: a float would round
    99999999999999999999999 to 99999999999999991611392. ValueError when it is not a whole number."""
    from decimal import Decimal, InvalidOperation

    try:
        return int(text)
    except ValueError:
        pass
    try:
        exact = Decimal(text)
    except InvalidOperation:
        raise ValueError(text) from None
    if not exact.is_finite() or exact != exact.to_integral_value():
        raise ValueError(text)
    if exact.adjusted() > 100:  # int() of 1e999999999 would build a number of a billion digits
        raise ValueError(text)
    return int(exact)  # coerce then refuses what does not fit in 64 bits


def coerce(value, tp, where: str, auto: bool = False):
    """Check (YAML) or convert (command-line strings) `value` to the field type `tp`; clear error otherwise. A number
    is finite (no option takes inf or nan), an integer fits in 64 bits. `auto`: "auto" is an unset value too."""
    value = _coerce(value, tp, where, auto)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ConfigError(f"{where}: {value} is out of range: an integer option must be below 2**63 ({INT64_MAX:,})")
    return value


def _coerce(value, tp, where: str, auto: bool = False):
    base, optional = _base_type(tp)
    unset = UNSET_WORDS + (("auto",) if auto else ())
    if value is None or (isinstance(value, str) and optional and value.strip().lower() in unset):
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {'null' if value is None else repr(value)}")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.{hint}")
        return value
    if isinstance(value, str) and base is not str:
        return _parse_text(value.strip(), base, tp, where)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # YAML's 5.0e+5; beyond 2**53 a float no longer holds every integer
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        kind = type(value).__name__
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({kind})")
    return value


def did_you_mean(key: str, valid, what: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{what}: unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}")


# -------------------------------------------------------------------------------------- the field index


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def sections(cls) -> dict[str, type] | None:
    """{section name: section dataclass} for a sectioned config, None for a flat one."""
    hints = _hints(cls)
    found = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if all(dataclasses.is_dataclass(t) for t in found.values()):
        return found
    return None


def option_index(cls) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """Option name -> (section or None, field, resolved type). Names must be unique across sections."""
    index = {}
    parts = sections(cls) or {None: cls}
    for section, part in parts.items():
        hints = _hints(part)
        for f in dataclasses.fields(part):
            if f.name in index:
                first = index[f.name][0]
                raise RuntimeError(f"config field {f.name!r} is declared in both {first} and {section}")
            index[f.name] = (section, f, hints[f.name])
    aliases(cls, index)  # checks that no alias is another option's name
    return index


def _aliases_of(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple(f.metadata.get("aliases", ()))


def _takes_auto(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("auto"))


def aliases(cls, index: dict | None = None) -> dict[str, str]:
    """{alias: option name} over the whole config (`opt(..., aliases=...)`). An alias that is also an option's name
    or another option's alias is a bug of the declaration."""
    index = option_index(cls) if index is None else index
    found: dict[str, str] = {}
    for name, (_, f, _) in index.items():
        for alias in _aliases_of(f):
            if alias in index or alias in found:
                raise RuntimeError(f"alias {alias!r} of {name!r} is already an option or an alias")
            found[alias] = name
    return found


def canonical(key: str, alias_map: dict[str, str]) -> str:
    """An option's name for `key`, which may be one of its aliases."""
    return alias_map.get(key, key)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ------------------------------------------------------------------------------------- building configs


def read_values(cls, raw, where: str = "config") -> dict:
    """The checked and typed values of a mapping (YAML): {field: value}, or {section: {field: value}}.

    Unknown keys are refused with a "did you mean"; missing keys are left out (they keep their defaults).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    parts = sections(cls)
    if parts is None:
        return _read_part(cls, raw, where, "")
    values = {}
    for section, part in raw.items():
        if section not in parts:
            raise did_you_mean(section, parts, where)
        part = part or {}
        if not isinstance(part, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {part!r}")
        values[section] = _read_part(parts[section], part, f"{where} [{section}]", f"{section}.")
    return values


def _read_part(cls, raw: dict, where: str, prefix: str) -> dict:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    alias_map = {a: f.name for f in fields.values() for a in _aliases_of(f)}
    values = {}
    for key, value in raw.items():
        name = canonical(key, alias_map)
        if name not in hints:
            raise did_you_mean(key, [*hints, *alias_map], where)
        if name in values:
            raise ConfigError(f"{where}: {prefix}{name} is given twice (as {name!r} and as its alias {key!r})")
        values[name] = coerce(value, hints[name], f"{where}: {prefix}{key}", _takes_auto(fields[name]))
    return values


def _construct(cls, values: dict):
    parts = sections(cls)
    if parts is not None:
        return cls(**{name: _construct(part, values.get(name, {})) for name, part in parts.items()})
    required = [f.name for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING]
    missing = [f"--{name}" for name in required if name not in values]
    if missing:
        raise ConfigError(f"missing required option {', '.join(missing)} (see --help)")
    return cls(**values)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the later one silently, so a
    preset edited in two places would run with one of them unnoticed)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}): keep one",
                    key_node.start_mark,
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """A YAML file as a mapping, or a ConfigError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder, not a YAML file: pass the preset file itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): save it as UTF-8."
        ) from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    return loaded or {}


def build(cls, preset: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """The defaults, then the YAML preset, then the flat overrides {field: value or string}; validated."""
    values = read_values(cls, load_yaml(preset), str(preset)) if preset is not None else {}
    index = option_index(cls)
    alias_map = aliases(cls, index)
    for key, value in (overrides or {}).items():
        name = canonical(key, alias_map)
        if name not in index:
            raise did_you_mean(key, [*index, *alias_map], "command line")
        section, f, tp = index[name]
        target = values.setdefault(section, {}) if section else values
        target[name] = coerce(value, tp, f"--{key}", _takes_auto(f))
    cfg = _construct(cls, values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def build_parser(cls, description: str | None = None, extra=None) -> argparse.ArgumentParser:
    """`--config FILE` plus one `--<field>` (alias `--<field-with-dashes>`) per config field, grouped by section for
    a sectioned config; a field with choices shows them (`{adamw,muon}`). `extra`: a flat dataclass of options that
    are not part of the config (see `parse`), in a group of their own, titled by its docstring's first line. A
    field's aliases are further flags of the same option, each listed as "the same as --name"."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--config FILE] [--OPTION VALUE ...]",
        description=description,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML preset; options given here override it")
    parser.add_argument(
        "--debug", nargs="?", const="true", help=f"show the traceback of expected errors too (same as {DEBUG_ENV}=1)"
    )
    parts = sections(cls) or {}
    groups = {
        name: parser.add_argument_group(f"{name} (the YAML `{name}:` section)", _summary(part))
        for name, part in parts.items()
    }
    for name, (section, f, tp) in option_index(cls).items():
        _add_option(groups.get(section, parser), name, f, tp)
    if extra is not None:
        group = parser.add_argument_group(_summary(extra))
        for name, (_, f, tp) in _extra_index(cls, extra).items():
            _add_option(group, name, f, tp)
    return parser


def _add_option(group, name: str, f: dataclasses.Field, tp) -> None:
    """`--name` and `--name-with-dashes` for field `f` of type `tp`: its help, type and default shown; a bool's bare
    flag means true."""
    default = _default(f)
    shown = "required" if default is dataclasses.MISSING else f"default {default}"
    shown = "default auto" if default is None and _takes_auto(f) else shown
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    base = _base_type(tp)[0]
    extra = {"nargs": "?", "const": "true"} if base is bool else {}
    if typing.get_origin(base) is Literal:
        metavar = "{" + ",".join(map(str, typing.get_args(base))) + "}"
    else:
        metavar = _type_name(tp).split()[0].upper()
    group.add_argument(
        *flags,
        dest=name,
        metavar=metavar,
        help=f"{f.metadata.get('help', '')} [{_type_name(tp, _takes_auto(f))}; {shown}]".strip(),
        **extra,
    )
    for alias in _aliases_of(f):  # a dest of its own: `parse` refuses two different values
        flags = [f"--{alias}"] + ([f"--{alias.replace('_', '-')}"] if "_" in alias else [])
        group.add_argument(*flags, dest=alias, metavar=metavar, help=f"the same as --{name}", **extra)


def _extra_index(cls, extra) -> dict[str, tuple[None, dataclasses.Field, Any]]:
    """option_index of the flat dataclass `extra`, whose names must differ from the config's."""
    index, taken = option_index(extra), option_index(cls)
    clash = sorted(set(index) & set(taken))
    if clash:
        raise RuntimeError(f"options {clash} are declared both in {cls.__name__} and in {extra.__name__}")
    return index


def _summary(cls) -> str | None:
    """The first line of a dataclass's own docstring (None for the generated one: `ClassName(field, ...)`)."""
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0]


def parse(cls, argv: list[str] | None = None, description: str | None = None, adjust=None, extra=None):
    """The command line of a script: `--config FILE --field value ...` -> a validated `cls`.

    Unknown options exit with argparse's usage error (exit code 2) and a "did you mean" hint; bad values raise
    ConfigError, which the scripts turn into one `error: ...` line and exit code 2. `adjust(values)`, if given,
    may rewrite the command line's {field: value} before they override the preset.

    `extra`: a flat dataclass of options that are not part of the config (train.py's `--plan` and its settings):
    the same spellings, types and checks (its own `validate()`), listed in --help, never read from a preset nor
    saved with the config. With it, `(config, extra's instance)` is returned.
    """
    parser = build_parser(cls, description, extra)
    args, unknown = parser.parse_known_args(_negative_values(sys.argv[1:] if argv is None else argv))
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        key = flag.lstrip("-").split("=")[0].replace("-", "_")
        names = [*option_index(cls), *aliases(cls)] + (list(option_index(extra)) if extra is not None else [])
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        parser.error(f"unknown option {flag!r}.{hint} See --help for the full list.")
    values = vars(args)
    values.pop("debug", None)  # read by `run` from the command line itself
    for name, (_, f, _) in option_index(cls).items():
        for alias in f.metadata.get("aliases", ()):
            if alias in values:
                given = values.pop(alias)
                if values.setdefault(name, given) != given:
                    raise ConfigError(
                        f"--{alias} is another name for --{name}, and they were given different values "
                        f"({given!r}, {values[name]!r}): give one of them."
                    )
    preset = values.pop("config", None)
    if extra is None:
        return build(cls, preset, adjust(values) if adjust else values)
    options = build(extra, None, {name: values.pop(name) for name in option_index(extra) if name in values})
    return build(cls, preset, adjust(values) if adjust else values), options


def _negative_values(argv: list[str]) -> list[str]:
    """`--max_lr -1e-3` as `--max_lr=-1e-3`: argparse takes a word that starts with '-' for an option unless it
    looks like a plain negative number (`-1`, `-0.5`), so `-1e-3` or `-inf` would leave the option without its
    value. Joined, the value reaches the option's own check (which refuses it by range, for example)."""
    out, i = [], 0
    while i < len(argv):
        arg, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--") and "=" not in arg and value is not None and _is_negative_number(value):
            out.append(f"{arg}={value}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def _is_negative_number(text: str) -> bool:
    if not text.startswith("-"):
        return False
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def flat_options(values: dict) -> dict:
    """{"optim": {"max_lr": 1e-3}, ...} -> {"max_lr": 1e-3, ...}: a config's values by option name (option names
    are unique across sections, see option_index)."""
    flat = {}
    for key, value in values.items():
        flat.update(flat_options(value) if isinstance(value, dict) else {key: value})
    return flat


def to_yaml(cfg) -> str:
    """The config as a YAML preset (re-runnable with --config)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------- running scripts


def debugging(argv: list[str] | None = None) -> bool:
    """Whether tracebacks of expected errors are wanted: `--debug` (or `--debug true`) or GPT2_REPRO_DEBUG=1."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--debug":
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            return following not in ("false", "0", "no", "off")
        if arg.startswith("--debug="):
            return arg.split("=", 1)[1].lower() not in ("false", "0", "no", "off")
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def run(main) -> None:
    """Run a script's `main()` the way every script ends.

    An expected error (errors.EXPECTED: bad input, hostile environment), or an OSError caused by the environment
    (full disk, read-only folder, a file in the way), ends it with one `error: ...` line and exit code 2; a `Stop`
    with its message and exit code; Ctrl-C with exit code 130. Anything else is a bug and keeps its traceback.
    `--debug` or GPT2_REPRO_DEBUG=1 prints the traceback of the expected ones too, and keeps their exit code (a
    scheduler that requeues on 75 sees 75 either way).
    """
    debug = debugging()

    def end(message: str, code: int) -> None:
        if debug:
            traceback.print_exc()
        if message:  # processes other than the main one may stop silently
            print(message, file=sys.stderr)
        sys.exit(code)

    try:
        main()
    except Stop as e:
        end(str(e), e.exit_code)
    except EXPECTED as e:
        end(f"error: {e}", 2)
    except KeyboardInterrupt:
        end("interrupted", 130)
    except Exception as e:
        described = describe_environment_error(e)
        if described is None:
            raise
        end(f"error: {described}", 2)
