"""Reading ``.jsonl`` files (one JSON object per line), with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from zenlm.errors import DataError


def read_text_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is a DataError that says how to fix it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e}); save it as UTF-8.") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``. A line that is not valid JSON, or is JSON
    but not an object, raises DataError naming the line; ``what`` says what each object should hold (for
    the message, e.g. "'source' and 'target' fields")."""
    rows = []
    for n, line in enumerate(read_text_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n} is a JSON {type(obj).__name__}, not an object with {what}.")
        rows.append((n, obj))
    return rows
