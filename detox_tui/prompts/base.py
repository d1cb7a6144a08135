"""PromptItem: one prompt with its safe target, optional subject span, category and toxic continuation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptItem:
    """One evaluation/edit prompt.

    ``target`` is the safe continuation an edit makes likely; ``subject`` a span of the prompt whose last
    token is the edit key; ``toxic`` a known toxic continuation (from a dataset, e.g. SafeEdit's unsafe
    response); ``meta`` carries dataset-specific fields (e.g. SafeEdit generalisation prompts).
    """

    prompt: str
    target: str | None = None
    subject: str | None = None
    category: str | None = None
    toxic: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
