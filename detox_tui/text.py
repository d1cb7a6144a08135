"""Untrusted text (prompts, targets, generations, model names, notes, error messages) made safe to show.

Such text is data: it is never parsed as markup, and the characters a terminal, a Markdown viewer or a reader's
eye would act on instead of showing are turned into visible escapes:

- C0 and C1 control characters and DEL (``\\x1b`` for ESC, ``\\x9b`` for CSI, ``\\x7f``), which would clear the
  screen, set the window title or move the cursor when written to a terminal;
- bidirectional controls (``\\u202e`` RIGHT-TO-LEFT OVERRIDE and the other embeddings, overrides, isolates and
  marks), which reorder what is shown so it reads differently from what is stored;
- line and paragraph separators (U+2028, U+2029) and lone surrogates (``\\ud800``), which are not text;
- on one line (table cells, log lines), newline, carriage return and tab too (``\\n``, ``\\r``, ``\\t``).

This module imports nothing beyond the standard library (rich only inside ``plain``), so the engine may use it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

# Bidirectional formatting characters (Unicode UAX #9): marks, embeddings, overrides and isolates.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# C0 and C1 controls and DEL (Unicode category Cc), line and paragraph separators (Zl, Zp), surrogates (Cs).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_UNSAFE = re.compile(f"[{_CONTROLS}{_BIDI}]")
# The same without newline and tab, for text shown over several lines.
_UNSAFE_MULTILINE = re.compile(f"(?![\n\t])[{_CONTROLS}{_BIDI}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: Any, *, one_line: bool = True) -> str:
    """``text`` with control, bidi and surrogate characters shown as escapes (``\\x1b``, ``\\u202e``).

    ``one_line`` (the default, for table cells and log lines) escapes newlines, carriage returns and tabs too;
    with ``one_line=False`` (a detail view, a dialog) newlines and tabs are kept. Markup-looking text such as
    ``[/bold]`` is left as it is: show the result as plain text (``plain``), never as markup.
    """
    text = "" if text is None else str(text)
    return (_UNSAFE if one_line else _UNSAFE_MULTILINE).sub(_escape, text)


def plain(text: Any, style: str = "", *, one_line: bool = True) -> Text:
    """A rich ``Text`` of ``visible(text)``: shown literally (never parsed as markup), escapes visible."""
    from rich.text import Text

    return Text(visible(text, one_line=one_line), style=style)


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (a JSON ``"\\ud800"`` decodes to one; it cannot be written as
    UTF-8), else None."""
    match = _SURROGATE.search(text)
    return match.group() if match else None
