"""Widgets of the detox-tui Textual app, one per file."""
