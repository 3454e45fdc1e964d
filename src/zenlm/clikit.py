"""Turn plain typed functions into command-line verbs (argparse), with YAML config files.

A verb is an ordinary function. Its parameters become flags (``max_steps`` -> ``--max-steps``), its type
hints choose the parsing (bool -> ``--flag/--no-flag``, ``Literal`` -> choices, ``X | None`` -> X,
``list[X]`` -> one or more values), its defaults are the defaults, and the ``Args:`` section of its
docstring is the help. Parameters named in ``positional`` are positional arguments. Every verb also
accepts ``--config FILE``: a YAML mapping of flag names (dashes or underscores) to values; flags given
on the command line win over the file.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _arg_help(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].strip()
    helps: dict[str, str] = {}
    m = re.search(r"^Args:\s*$(.*?)(?=^\S|\Z)", doc, flags=re.M | re.S)
    if m:
        current = None
        for line in m.group(1).splitlines():
            hit = re.match(r"^\s{2,}(\w+):\s*(.*)$", line)
            if hit:
                current = hit.group(1)
                helps[current] = hit.group(2).strip()
            elif current and line.strip():
                helps[current] += " " + line.strip()
    return summary, helps


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_verb(sub: argparse._SubParsersAction, name: str, fn: Callable, positional: tuple[str, ...] = ()) -> None:
    """Add ``fn`` as the sub-command ``name``."""
    summary, helps = _arg_help(fn)
    p = sub.add_parser(name, help=summary, description=inspect.getdoc(fn).split("Args:")[0].strip()
                       if fn.__doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file with flag values (flags on the "
                   "command line win)")
    hints = typing.get_type_hints(fn)
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if pname.startswith("_"):
            continue
        tp, _ = _unwrap_optional(hints.get(pname, str))
        has_default = param.default is not inspect.Parameter.empty
        kw: dict[str, Any] = {"help": helps.get(pname, "")}
        if has_default and param.default is not None and tp is not bool:
            kw["help"] += f" (default: {param.default})"
        origin = typing.get_origin(tp)
        if origin is Literal:
            choices = typing.get_args(tp)
            kw["choices"] = choices
            kw["type"] = type(choices[0])
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw["nargs"] = "+"
            kw["type"] = inner
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kw["type"] = tp
        elif tp is Path:
            kw["type"] = Path
        else:
            kw["type"] = str
        if pname in positional:
            if has_default:  # optional: a list may be empty, a single value may be left out
                kw["nargs"] = "*" if kw.get("nargs") == "+" else "?"
            p.add_argument(pname, **kw, default=param.default if has_default else None)
            continue
        flag = "--" + pname.replace("_", "-")
        kw["dest"] = pname
        kw["default"] = param.default if has_default else None
        if not has_default:
            required.append(pname)
            kw["help"] += " (required)"
        p.add_argument(flag, **kw)
    p.set_defaults(_fn=fn, _required=required, _parser=p, _positional=positional)


def _apply_config_file(ns: argparse.Namespace, argv: list[str]) -> None:
    """Fill in values from --config for the flags not given on the command line."""
    if not getattr(ns, "config", None):
        return
    parser: argparse.ArgumentParser = ns._parser
    path: Path = ns.config
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        parser.error(f"--config {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    known = {a.dest: a for a in parser._actions}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            parser.error(f"--config {path}: unknown setting {key!r}; see --help for the flags")
        action = known[dest]
        flags = set(action.option_strings)
        if flags & given or (not flags and getattr(ns, dest) is not None):
            continue  # given on the command line
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = _parse_bool(value) if action.type is bool else action.type(value)
            except (TypeError, ValueError) as e:
                parser.error(f"--config {path}: {key}: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}={value!r} is not one of {list(action.choices)}")
        setattr(ns, dest, value)


def call_verb(ns: argparse.Namespace, argv: list[str]) -> Any:
    """Apply --config, check required flags, and call the verb's function with the parsed values."""
    _apply_config_file(ns, argv)
    missing = [n for n in ns._required if getattr(ns, n, None) is None]
    if missing:
        ns._parser.error("the following arguments are required: "
                         + ", ".join(n if n in ns._positional else "--" + n.replace("_", "-") for n in missing))
    fn = ns._fn
    kwargs = {n: getattr(ns, n) for n in inspect.signature(fn).parameters if hasattr(ns, n)}
    return fn(**kwargs)
