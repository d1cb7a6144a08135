"""Prompt sets: the builtin curated set and loaders for local files and hf: datasets."""
