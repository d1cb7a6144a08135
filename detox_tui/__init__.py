"""detox-tui: locate and edit toxic behaviour in open-weight language models, with honest statistics."""

__version__ = "0.1.0"
