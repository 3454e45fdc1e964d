"""Chat templates rendered with bounded work: in this process, or in a worker process with a deadline.

A chat template is a Jinja program that comes with the model (``tokenizer_config.json``), and a model taken
from elsewhere can carry a hostile one. Jinja's sandbox keeps a template away from Python's objects, but not
from work: ``{% for a in range(100000) %}{% for b in range(100000) %}`` runs for hours and ``{{ 'x' * 10**10 }}``
asks for 10 GB. Rendering here is bounded three ways:

    sizes    ``*``, ``**`` and ``%`` are checked before they run: a string or list repeated past
             ``max_chars``, a power of more than MAX_POWER_BITS bits, a ``%`` format wider than
             ``max_chars`` are refused; the output is produced piece by piece and stops past ``max_chars``
    time     :class:`TemplateWorker` renders in a separate process and waits at most ``timeout`` seconds;
             past it the process is killed (a Python thread could not be stopped) and the next render
             starts a fresh one
    memory   that process runs under an address-space limit (``memory_bytes``), so an allocation the size
             checks did not foresee (a filter's huge width, say) fails there with MemoryError

``{% generation %} ... {% endgeneration %}`` marks what the assistant writes (Hugging Face's convention for
assistant-only training, which TRL reads too): :func:`render` can return the character spans of the marked
output, and a template that uses the marks renders the same text as one that does not.

This module imports only the standard library and jinja2, so the worker (``python -I THIS_FILE``) starts in a
fraction of a second; it is the one place that builds the template environment, for both ways of rendering.
The worker speaks JSON lines over its stdin and stdout (no pickle).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

MAX_POWER_BITS = 4096  # a ** b whose result would need more bits than this is refused
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d+)(?:\.(\d+))?")


class TemplateError(Exception):
    """The template refused the messages (``raise_exception``), failed on them, or ran past a bound.
    ``kind``: "refused", "failed" or "limit"."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


# While :func:`render` tracks spans: [characters yielded so far], and the (start, end) list it fills
_TRACKING: ContextVar[tuple[list[int], list[tuple[int, int]]] | None] = ContextVar("zenlm_generation_spans",
                                                                                    default=None)


class _GenerationMarks(jinja2.ext.Extension):
    """``{% generation %}BODY{% endgeneration %}`` renders BODY unchanged and, while :func:`render` tracks
    spans, records where in the output it went: from the characters produced before it to that plus
    ``len(BODY)`` (the rule Hugging Face's ``apply_chat_template(return_assistant_tokens_mask=True)`` uses)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            produced, spans = tracking
            spans.append((produced[0], produced[0] + len(text)))
        return text


_MARK_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def without_generation_marks(template: str) -> str:
    """``template`` with each ``{% generation %}`` / ``{% endgeneration %}`` tag replaced by ``{% if true %}`` /
    ``{% endif %}`` (whitespace control kept): the same output, for template engines that do not know the marks
    (llama.cpp's)."""
    return _MARK_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox with the size checks of the module docstring on ``*``, ``**`` and ``%``, the
    ``{% generation %}`` marks and the loop controls (``{% break %}``, ``{% continue %}``) that Hugging Face's
    template environment has too."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationMarks, jinja2.ext.loopcontrols])
        self.max_chars = max_chars

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise TemplateError(f"the chat template repeats a {type(seq).__name__} past {self.max_chars} "
                                    "items", "limit")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    right * abs(left).bit_length() > MAX_POWER_BITS:
                raise TemplateError(f"the chat template computes a power of more than {MAX_POWER_BITS} bits",
                                    "limit")
        elif operator == "%" and isinstance(left, str):
            for width, precision in _FORMAT_WIDTH.findall(left):
                if int(width or 0) > self.max_chars or int(precision or 0) > self.max_chars:
                    raise TemplateError("the chat template formats a field wider than its output may be", "limit")
        return super().call_binop(context, operator, left, right)


def compile_template(template: str, max_chars: int) -> jinja2.Template:
    """The template compiled in the bounded sandbox, with ``raise_exception(message)`` (Hugging Face's way for
    a template to refuse messages) defined. TemplateError when it is not valid Jinja."""
    env = _BoundedEnvironment(max_chars)

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the messages: {message}", "refused")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to compile ({e}).") from None


def render(tpl: jinja2.Template, messages: list[dict[str, str]], add_generation_prompt: bool,
           tokens: dict[str, str], max_chars: int) -> str:
    """The prompt text of ``messages``; the template sees the special tokens (``bos_token`` ...) as
    variables. TemplateError when it refuses, fails, or its output passes ``max_chars`` characters."""
    return render_spans(tpl, messages, add_generation_prompt, tokens, max_chars, track=False)[0]


def render_spans(tpl: jinja2.Template, messages: list[dict[str, str]], add_generation_prompt: bool,
                 tokens: dict[str, str], max_chars: int, *, track: bool = True
                 ) -> tuple[str, list[tuple[int, int]]]:
    """:func:`render`, and the ``(start, end)`` character spans of the output that ``{% generation %}`` marks
    (what the assistant writes; empty when the template has no marks or ``track`` is False)."""
    out: list[str] = []
    produced = [0]
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((produced, spans) if track else None)
    try:
        for piece in tpl.generate(messages=messages, add_generation_prompt=add_generation_prompt, **tokens):
            produced[0] += len(piece)
            if produced[0] > max_chars:
                raise TemplateError(f"the chat template's output passed {max_chars} characters", "limit")
            out.append(piece)
    except TemplateError:
        raise
    except (MemoryError, OverflowError, RecursionError) as e:
        raise TemplateError(f"the chat template ran out of room ({type(e).__name__})", "limit") from None
    except Exception as e:  # jinja2.TemplateError, or whatever a filter raised (TypeError, ValueError ...)
        raise TemplateError(f"the chat template failed on these messages ({e}).") from None
    finally:
        _TRACKING.reset(token)
    return "".join(out), spans


class TemplateWorker:
    """Renders one template in a worker process, at most ``timeout`` seconds per render (see the module
    docstring). Thread-safe: renders are taken one at a time. The process starts on the first render and
    again after one was killed; :meth:`close` ends it."""

    def __init__(self, template: str, tokens: dict[str, str], *, timeout: float = 2.0, max_chars: int = 1 << 22,
                 memory_bytes: int = 1 << 30) -> None:
        self.init = {"template": template, "tokens": tokens, "max_chars": max_chars, "memory_bytes": memory_bytes}
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        with self._lock:
            deadline = time.monotonic() + self.timeout
            if self._proc is None or self._proc.poll() is not None:
                self._start()
                deadline = time.monotonic() + self.timeout  # starting does not count
            assert self._proc is not None and self._proc.stdin is not None
            request = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._read_line(deadline)
            except (OSError, TimeoutError) as e:
                self._kill()
                if isinstance(e, TimeoutError):
                    raise TemplateError(f"the chat template took longer than {self.timeout:g} s", "limit") from None
                raise TemplateError("the chat template's worker process failed", "limit") from None
            if line is None:  # the process died (out of memory, killed)
                self._kill()
                raise TemplateError("the chat template's worker process ended while rendering", "limit")
        reply = json.loads(line)
        if "text" not in reply:
            raise TemplateError(reply["error"], reply["kind"])
        return reply["text"]

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _start(self) -> None:
        self._kill()
        # -I: isolated (no user site, no PYTHON* variables, not the script's folder on sys.path): the worker
        # imports the standard library and jinja2 only
        self._proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(self.init).encode() + b"\n")
        self._proc.stdin.flush()
        self._buffer = b""

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker by ``deadline`` (TimeoutError), or None when it closed its output."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                if f is not None:
                    f.close()
            self._proc = None

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None and self._proc.poll() is None:
            self._proc.kill()


def _worker_main() -> None:
    """The worker: read the template once, then render one JSON request per line until stdin closes."""
    init = json.loads(sys.stdin.buffer.readline())
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (init["memory_bytes"], init["memory_bytes"]))
    except (ImportError, ValueError, OSError):  # no address-space limit here: the deadline still holds
        pass
    max_chars = init["max_chars"]
    try:
        tpl: jinja2.Template | TemplateError = compile_template(init["template"], max_chars)
    except TemplateError as e:
        tpl = e
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            if isinstance(tpl, TemplateError):
                raise tpl
            reply: dict[str, Any] = {"text": render(tpl, request["messages"], request["add_generation_prompt"],
                                                    init["tokens"], max_chars)}
        except TemplateError as e:
            reply = {"error": str(e), "kind": e.kind}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _worker_main()
