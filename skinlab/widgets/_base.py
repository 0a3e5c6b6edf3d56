"""Shared plumbing of the forms: the feedback area and the guard around every callback.

Widget callbacks swallow exceptions (ipywidgets logs them where nobody looks), so every handler
of the forms is wrapped by :func:`guard`: an error is shown in the form's own output area, in
words. Errors that are not the user's (bugs) are also passed to the hooks registered with
:func:`add_error_hook`, which is how the test suite fails a test in which a callback broke.
"""

from __future__ import annotations

import functools
import html
import logging
import threading
from typing import Any, Callable

import ipywidgets as widgets

from .logic import is_user_error

__all__ = ["Feedback", "add_error_hook", "guard", "remove_error_hook"]

log = logging.getLogger("skinlab.widgets")

_hooks: list[Callable[[BaseException, str], None]] = []


def add_error_hook(hook: Callable[[BaseException, str], None]) -> None:
    """Call ``hook(exception, where)`` whenever a form callback fails with an unexpected error."""
    _hooks.append(hook)


def remove_error_hook(hook: Callable[[BaseException, str], None]) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def report_bug(exc: BaseException, where: str) -> None:
    log.error("skinlab form: unexpected error in %s", where, exc_info=exc)
    for hook in list(_hooks):
        hook(exc, where)


_STYLE = {
    "info": ("#333", ""),
    "ok": ("#009E73", "\u2714 "),
    "warn": ("#B35900", "\u26a0 "),
    "error": ("#D55E00", "\u2716 "),
}


class Feedback:
    """The messages of one form, shown in its own :class:`ipywidgets.Output` (never printed).

    Safe to call from worker threads: each message appends one output to the widget's
    ``outputs``. ``messages`` keeps ``(level, text)`` for tests and for code.
    """

    def __init__(self, output: widgets.Output | None = None, *, keep: int = 40) -> None:
        self.output = output or widgets.Output()
        self.output.add_class("skinlab-feedback")
        self.keep = keep
        self.messages: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, text: str) -> None:
        colour, mark = _STYLE[level]
        body = html.escape(str(text)).replace("\n", "<br>")
        item = {"output_type": "display_data", "metadata": {},
                "data": {"text/plain": f"{mark}{text}",
                         "text/html": f"<div class='skinlab-msg skinlab-msg-{level}' style='color:{colour};"
                                      f"font-size:12px;line-height:1.4;margin:1px 0'>{mark}{body}</div>"}}
        with self._lock:
            self.messages.append((level, str(text)))
            del self.messages[:-self.keep]
            self.output.outputs = (tuple(self.output.outputs) + (item,))[-self.keep:]

    def info(self, text: str) -> None:
        self._add("info", text)

    def ok(self, text: str) -> None:
        self._add("ok", text)

    def warn(self, text: str) -> None:
        self._add("warn", text)

    def error(self, text: str) -> None:
        self._add("error", text)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.output.outputs = ()

    def text(self) -> str:
        """All messages as plain text, one a line."""
        return "\n".join(t for _, t in self.messages)

    def show_exception(self, exc: BaseException, where: str) -> None:
        """Say what went wrong; a bug is also reported to the error hooks."""
        if is_user_error(exc):
            self.error(str(exc) or type(exc).__name__)
        else:
            self.error(f"Unexpected error in {where} ({type(exc).__name__}: {exc}). This is a bug in skinlab; "
                       "the details are in the kernel log.")
            report_bug(exc, where)


def guard(method: Callable) -> Callable:
    """Wrap a form method used as a widget callback: errors go to ``self.feedback``."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.feedback.show_exception(exc, f"{type(self).__name__}.{method.__name__}")
            return None

    return wrapper


def section(title: str, hint: str = "") -> widgets.HTML:
    text = f"<h3 style='margin:6px 0 2px 0'>{html.escape(title)}</h3>"
    if hint:
        text += f"<div style='color:#555;font-size:12px;line-height:1.4'>{hint}</div>"
    return widgets.HTML(text)
