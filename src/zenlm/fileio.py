"""Files written whole or not at all.

Everything zenlm writes (configs, tokenizers, weights, reports, plots, imported runs) goes to a temporary name
beside its destination and is renamed into place only when complete: a crash or a full disk never leaves a
half-written file under the real name, and a reader never sees one. ``os.replace`` is atomic on POSIX and
Windows when both names are on the same file system, which a sibling temporary name guarantees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temporary_sibling(path: Path) -> Path:
    # hidden, unique per process, and with the same suffix (writers such as matplotlib pick the format from it)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path`` through: renamed onto ``path`` when the ``with`` block ends normally,
    removed when it raises. Works for a file or a directory: an existing directory at ``path`` is moved aside,
    the new one renamed in, and only then the old one deleted, so ``path`` is always one or the other whole::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = _temporary_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # a directory cannot be renamed onto a non-empty one: swap
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # put the previous one back
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str],
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the permissions every other file gets (0666 less the umask):
    safetensors itself creates files 0600, which would leave weights the only unreadable files of a shared
    run directory. Not atomic by itself: call it on a path from :func:`atomic_path`, or inside a temporary
    directory that is renamed into place."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whole or not at all (:func:`atomic_path` + :func:`write_safetensors`)."""
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, metadata)


def read_json_object(path: str | os.PathLike[str], error: type[Exception], hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ``error(message)`` naming the file when it is not valid UTF-8 JSON or not
    an object (``hint``, e.g. "re-run zenlm prepare", is appended to the message)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}){tail}.") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not a {type(data).__name__}{tail}.")
    return data


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_path", "atomic_write_text", "file_sha256", "write_safetensors", "save_safetensors",
           "read_json_object"]
