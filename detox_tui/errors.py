"""User-facing errors: one clear sentence, shown without a traceback unless --debug."""

from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix (bad file, unknown model, layer out of range...).

    The message must be one clear sentence. The CLI prints it and exits with code 2; the TUI shows it
    as a notification.
    """


class Cancelled(Exception):
    """Raised inside the engine when the cancel flag is set; weights are already restored."""
