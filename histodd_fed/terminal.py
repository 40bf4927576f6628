"""What the CLIs print to a terminal: text from outside (file names, bundle fields, exception
messages that quote them) with every control and non-ASCII character escaped.

A file name or a sender-chosen string can carry terminal escape sequences (window title, clear
screen, colours, cursor moves, a carriage return or newline that fakes an "OK" line). Everything
printed that did not come from this program's own literals goes through :func:`printable`; the
CLIs' one-line error goes through :func:`error_line`.
"""

from __future__ import annotations


def escape(text: str) -> str:
    """``text`` with each character outside printable ASCII written as a Python escape (``\\x1b``)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else ascii(c)[1:-1] for c in text)


def printable(obj):
    """:func:`escape` every string in ``obj`` (a string, or JSON-like dicts and lists of them)."""
    if isinstance(obj, dict):
        return {printable(k): printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [printable(v) for v in obj]
    if isinstance(obj, str):
        return escape(obj)
    return obj


def error_line(exc: BaseException) -> str:
    """The CLIs' one-line error for ``exc``: ``error: MESSAGE``, escaped."""
    return f"error: {escape(str(exc))}"
