"""Turn plain typed functions into command-line verbs (argparse), with YAML config files.

A verb is an ordinary function. Its parameters become flags (``max_steps`` -> ``--max-steps``), its type
hints choose the parsing (bool -> ``--flag/--no-flag``, ``Literal`` -> choices, ``X | None`` -> X,
``list[X]`` -> one or more values), its defaults are the defaults, and the ``Args:`` section of its
docstring is the help. Parameters named in ``positional`` are positional arguments. Every verb also
accepts ``--config FILE``: a YAML mapping of flag names (dashes or underscores) to values; flags given
on the command line win over the file. Numbers are checked as they are read, from the command line and from
the file alike: a whole-number flag refuses 2.7 (it is not rounded), a float flag refuses nan and inf.

A verb that needs to know which flags the user gave (``--resume`` continues with the run's saved settings
except those) declares a parameter ``_given``: it receives the names of the flags given on the command line
or in the --config file.

A verb that runs a library function (a recipe) takes its flags from that function instead of repeating its
signature: :func:`params_of` reads the parameters of a function, or the fields of a settings dataclass
(``TrainConfig``), with their types, defaults and documented meaning, and ``add_verb(..., params=...)``
turns them into flags. The flags of such a verb are only built when the verb is used (or its ``--help`` is
asked for), so ``zenlm --help`` imports no recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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


REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none


@dataclass(frozen=True)
class Param:
    """One flag (or positional argument) of a verb: its name (``max_steps`` -> ``--max-steps``), its type hint,
    its default (REQUIRED: none) and its help text."""

    name: str
    type: Any = str
    default: Any = REQUIRED
    help: str = ""


_ENTRY = re.compile(r"^(\s*)(\w+(?:\s*/\s*\w+)*):\s+(.*)$")


def _documented(doc: str, names: Iterable[str]) -> dict[str, str]:
    """Help text per name from a docstring: the lines ``name: text`` (``a / b: text`` for two names), in an
    ``Args:`` section or in a block of their own, each followed by more-indented continuation lines."""
    wanted, helps = set(names), {}
    current: list[str] = []
    indent = 0
    for line in doc.splitlines():
        hit = _ENTRY.match(line)
        keys = [k.strip() for k in hit.group(2).split("/")] if hit else []
        if hit and keys and set(keys) <= wanted:
            current, indent = keys, len(hit.group(1))
            for k in keys:
                helps[k] = hit.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            for k in current:
                helps[k] += " " + line.strip()
        else:
            current = []
    return {k: v.replace("``", "") for k, v in helps.items()}


def params_of(
    source: Callable | type,
    *,
    only: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | Any = None,
    types: Mapping[str, Any] | None = None,
    rename: Mapping[str, str] | None = None,
    helps: Mapping[str, str] | None = None,
) -> list[Param]:
    """The parameters of function ``source``, or the fields of settings dataclass ``source``, as verb params.

    only:     these names, in this order (default: all, in declaration order)
    skip:     names to leave out (objects no flag can give: a ``train`` config, a progress callback)
    defaults: a mapping, or an instance of the dataclass, whose values replace the declared defaults (what a
              recipe passes when it builds the settings itself, e.g. ``TrainConfig(max_steps=1000)``)
    types:    type hints to use instead of the declared ones (e.g. a Literal of the accepted values)
    rename:   source name -> flag name (``{"name": "optimizer"}``)
    helps:    help texts to use instead of the documented ones
    """
    if dataclasses.is_dataclass(source):
        declared = {f.name: (f.default if f.default is not dataclasses.MISSING else
                             f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
                    for f in dataclasses.fields(source)}
    else:
        declared = {n: p.default for n, p in inspect.signature(source).parameters.items()}
    if defaults is not None and not isinstance(defaults, Mapping):
        defaults = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    defaults, types, rename, helps = defaults or {}, types or {}, rename or {}, helps or {}
    hints = typing.get_type_hints(source)
    documented = _documented(inspect.getdoc(source) or "", declared)
    names = list(only) if only is not None else [n for n in declared if n not in set(skip)]
    unknown = [n for n in names if n not in declared]
    assert not unknown, f"{getattr(source, '__name__', source)} has no parameters {unknown}"
    return [Param(rename.get(n, n), types.get(n, hints.get(n, str)), defaults.get(n, declared[n]),
                  helps.get(n, documented.get(n, ""))) for n in names]


def parse_int(s: Any) -> int:
    """A whole number from the command line or a --config file: "12", "1e3" and 2.0 are accepted, "2.7" and
    2.7 are refused (never rounded), as are booleans."""
    if isinstance(s, bool):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}")
    if isinstance(s, int):
        return s
    try:
        return int(str(s).strip())
    except ValueError:
        pass
    try:
        f = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if not (math.isfinite(f) and f.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}")
    return int(f)


def parse_float(s: Any) -> float:
    """A finite number from the command line or a --config file (nan and inf are refused)."""
    if isinstance(s, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    try:
        f = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(f):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return f


_PARSERS: dict[Any, Callable[[Any], Any]] = {int: parse_int, float: parse_float}


class _Given:
    """Mixed into the actions of flags: records that the flag was given (``namespace._given``)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]
        given = set(getattr(namespace, "_given", ()))
        given.add(self.dest)  # type: ignore[attr-defined]
        namespace._given = given


class _GivenStore(_Given, argparse._StoreAction):
    pass


class _GivenBool(_Given, argparse.BooleanOptionalAction):
    pass


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class VerbParser(argparse.ArgumentParser):
    """An ArgumentParser that adds its arguments on first use: parsing, ``--help`` or usage text."""

    populate: Callable[[], None] | None = None

    def _populated(self) -> None:
        if self.populate is not None:
            populate, self.populate = self.populate, None
            populate()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populated()
        return super().format_help()

    def format_usage(self) -> str:
        self._populated()
        return super().format_usage()


def add_verb(sub: argparse._SubParsersAction, name: str, fn: Callable, positional: tuple[str, ...] = (),
             params: Sequence[Param] | Callable[[], Sequence[Param]] | None = None) -> None:
    """Add ``fn`` as the sub-command ``name``. Its flags are ``params`` (a list, or a function returning one,
    called when the verb is first used), by default :func:`params_of` ``(fn)``; ``fn`` is called with one
    keyword argument per param. The verb's summary and description come from ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    p = sub.add_parser(name, help=doc.split("\n\n")[0].strip(), description=doc.split("Args:")[0].strip() or None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_fn=fn, _parser=p, _positional=positional)

    def populate() -> None:
        found = list(params() if callable(params) else params if params is not None else params_of(fn))
        own = _documented(doc, [q.name for q in found])  # the verb's own wording of a flag wins
        _add_params(p, [dataclasses.replace(q, help=own.get(q.name) or q.help) for q in found], positional)

    if isinstance(p, VerbParser):
        p.populate = populate
    else:
        populate()


def _add_params(p: argparse.ArgumentParser, params: list[Param], positional: tuple[str, ...]) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file with flag values (flags on the "
                   "command line win)")
    required: list[str] = []
    for param in params:
        if param.name.startswith("_"):
            continue
        tp, _ = _unwrap_optional(param.type)
        has_default = param.default is not REQUIRED
        kw: dict[str, Any] = {"help": param.help.replace("%", "%%")}  # argparse %-formats help strings
        if has_default and param.default is not None and tp is not bool:
            kw["help"] += f" (default: {param.default})".replace("%", "%%")
        origin = typing.get_origin(tp)
        if origin is Literal:
            choices = typing.get_args(tp)
            kw["choices"] = choices
            kw["type"] = type(choices[0])
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw["nargs"] = "+"
            kw["type"] = _PARSERS.get(inner, inner)
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kw["type"] = _PARSERS.get(tp, tp)
        elif tp is Path:
            kw["type"] = Path
        else:
            kw["type"] = str
        if param.name in positional:
            if has_default:  # optional: a list may be empty, a single value may be left out
                kw["nargs"] = "*" if kw.get("nargs") == "+" else "?"
            p.add_argument(param.name, **kw, default=param.default if has_default else None)
            continue
        flag = "--" + param.name.replace("_", "-")
        kw["action"] = _GivenBool if kw.get("action") is argparse.BooleanOptionalAction else _GivenStore
        kw["dest"] = param.name
        kw["default"] = param.default if has_default else None
        if not has_default:
            required.append(param.name)
            kw["help"] += " (required)"
        p.add_argument(flag, **kw)
    p.set_defaults(_required=required, _params=[q.name for q in params])


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
    given = set(getattr(ns, "_given", ()))
    known = {a.dest: a for a in parser._actions}
    from_file = set()
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            parser.error(f"--config {path}: unknown setting {key!r}; see --help for the flags")
        action = known[dest]
        if dest in given or (not action.option_strings and getattr(ns, dest) is not None):
            continue  # given on the command line
        try:
            value = _convert(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"--config {path}: {key}: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}={value!r} is not one of {list(action.choices)}")
        setattr(ns, dest, value)
        from_file.add(dest)
    ns._given = given | from_file


def _convert(action: argparse.Action, value: Any) -> Any:
    """A --config file's value for ``action``, parsed as the command line would parse it (each item of a list)."""
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return _parse_bool(value)
    if action.type is None:
        return value
    parse: Any = _parse_bool if action.type is bool else action.type
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise ValueError(f"expected one value, got the list {value!r}")
        return [parse(v) for v in value]
    if action.nargs in ("+", "*"):
        return [parse(value)]
    return parse(value)


def call_verb(ns: argparse.Namespace, argv: list[str]) -> Any:
    """Apply --config, check required flags, and call the verb's function with the parsed values."""
    _apply_config_file(ns, argv)
    missing = [n for n in ns._required if getattr(ns, n, None) is None]
    if missing:
        ns._parser.error("the following arguments are required: "
                         + ", ".join(n if n in ns._positional else "--" + n.replace("_", "-") for n in missing))
    kwargs = {n: getattr(ns, n) for n in ns._params if hasattr(ns, n) and not n.startswith("_")}
    if "_given" in inspect.signature(ns._fn).parameters:
        kwargs["_given"] = frozenset(getattr(ns, "_given", ()))
    return ns._fn(**kwargs)
