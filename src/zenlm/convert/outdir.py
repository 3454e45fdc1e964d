"""Where a conversion may write.

An import writes a zenlm run directory and an export a Hugging Face model directory. Either refuses an ``--out``
that is its own input, and an ``--out`` that holds anything but its own kind of result: another Hugging Face
model is never replaced by an import, a run never by an export, a folder of other files never by either. An
``--out`` of the right kind is replaced only with ``--overwrite``, and then whole (the writers build the result
in a temporary folder beside it and swap it in: :func:`zenlm.fileio.atomic_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from zenlm.errors import ConfigError

_KIND = {"run": "zenlm run directory (config.yaml)", "hf": "Hugging Face model directory (config.json)"}


def check_out_dir(out: str | os.PathLike[str], *, writes: Literal["run", "hf"],
                  sources: Sequence[str | os.PathLike[str]] = (), overwrite: bool = False) -> None:
    """Refuse (ConfigError) to write a ``writes`` directory ("run" or "hf") at ``out`` when ``out`` is one of
    ``sources``, a file, a non-empty folder of another kind, or one of its own kind without ``overwrite``."""
    out = Path(out)
    for src in sources:
        if out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise ConfigError(f"--out {out} is the directory being converted; write the result to another --out.")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write the {_KIND[writes]} into.")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    found = "run" if (out / "config.yaml").is_file() else "hf" if (out / "config.json").is_file() else None
    if found == writes:
        if overwrite:
            return
        raise ConfigError(f"{out} already holds a {_KIND[writes]}; choose another --out, or pass --overwrite to "
                          "replace it.")
    if found is not None:
        raise ConfigError(f"{out} is a {_KIND[found]}, which this conversion never replaces (not even with "
                          f"--overwrite); choose another --out, e.g. {out / 'converted'}.")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ConfigError(f"{out} is not empty ({shown}) and holds no {_KIND[writes]}; choose an empty or new --out so "
                      "nothing there is overwritten.")


__all__ = ["check_out_dir"]
