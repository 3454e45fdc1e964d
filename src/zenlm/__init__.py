"""zenlm: from raw text to a served language model.

    >>> import zenlm
    >>> lm = zenlm.load("runs/demo-en/run")
    >>> text = lm.generate("ROMEO:", max_new_tokens=60)
    >>> ppl = lm.perplexity(["To be, or not to be"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from zenlm.api import LM, load

__all__ = ["LM", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # Import the API (and with it torch) only when it is used, so `zenlm --help` starts quickly.
    if name in ("LM", "load"):
        from zenlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'zenlm' has no attribute {name!r}")
