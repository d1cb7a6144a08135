"""Prompt sets: the builtin curated set and loaders for local files and hf: datasets."""

from detox_tui.prompts.base import PromptItem
from detox_tui.prompts.corpora import load_corpus, load_neutral_prompts
from detox_tui.prompts.loaders import builtin_prompts_path, categories, load_prompts

__all__ = [
    "PromptItem",
    "builtin_prompts_path",
    "categories",
    "load_corpus",
    "load_neutral_prompts",
    "load_prompts",
]
