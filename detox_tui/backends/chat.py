"""Chat templates: what an instruction-tuned model sees for a prompt, and its tokens.

With a chat template a prompt is sent as one user turn followed by the generation prompt (the assistant turn's
opening), as the model was tuned to see it. The template's text is never part of a continuation: continuations
are the tokens generated (or teacher-forced) after the wrapped prompt, and scorers see only those.

The setting (``ExperimentConfig.chat_template``) is "auto" (wrap when the tokenizer has a template) or "none"
(raw prompts). It is applied per run by ``with_chat_template``, which returns a view of the loaded model that
shares its weights, tokenizer and per-model caches; every engine function that turns a prompt into tokens asks
this module (``prompt_ids``), so generation, log-probabilities, edit keys and DINM all see the same tokens.

The wrapped text is tokenised without adding special tokens again: templates write their own BOS (Llama 3's
``<|begin_of_text|>``, Gemma's ``<bos>``, Mistral's ``<s>``), so letting the tokenizer add one would double it.
An empty prompt is never wrapped: it stands for "from the start of a document".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from detox_tui.errors import UserError

CHAT_TEMPLATE_MODES: tuple[str, ...] = ("auto", "none")


def check_chat_template_mode(mode: str, option: str = "chat template setting") -> str:
    """The mode, checked: "auto" or "none"; anything else is a one-sentence UserError naming ``option``."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise UserError(f"Unknown {option} '{mode}'; use {' or '.join(CHAT_TEMPLATE_MODES)}.")
    return mode


def resolve_chat_template(tokenizer: Any, mode: str) -> str | None:
    """The template prompts are wrapped in under ``mode``: the tokenizer's own for "auto", None for "none"."""
    check_chat_template_mode(mode)
    if mode == "none":
        return None
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def with_chat_template(lm: Any, mode: str) -> Any:
    """``lm`` as a run with ``mode`` sees it: the same object when nothing changes, else a view of it.

    The view shares the model, the tokenizer and the per-model edit cache (context templates are sampled from
    raw text, so they do not depend on the prompt format).
    """
    template = resolve_chat_template(lm.tokenizer, mode)
    if template == lm.chat_template:
        return lm
    view = dataclasses.replace(lm, chat_template=template)
    view.__dict__["_edit_cache"] = lm.__dict__.setdefault("_edit_cache", {})
    return view


def uses_chat_template(lm: Any) -> bool:
    return getattr(lm, "chat_template", None) is not None


def format_prompt(lm: Any, prompt: str) -> str:
    """The text the model sees for ``prompt``: one user turn + the generation prompt, or the prompt itself."""
    template = getattr(lm, "chat_template", None)
    if template is None or not prompt:
        return prompt
    try:
        text = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # noqa: BLE001 - a template is user data: a Jinja error is the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise UserError(
            f"The tokenizer's chat template failed on the prompt '{prompt[:60]}' ({reason}); "
            "pass --chat-template none for raw prompts."
        ) from exc
    if not isinstance(text, str):
        raise UserError("The tokenizer's chat template did not return text; pass --chat-template none.")
    return text


def prompt_ids(lm: Any, prompt: str) -> list[int]:
    """Token ids the model sees for ``prompt``: the wrapped text without added special tokens (its template
    writes them), or the raw prompt with the tokenizer's special tokens (today's behaviour)."""
    if uses_chat_template(lm) and prompt:
        return list(lm.tokenizer(format_prompt(lm, prompt), add_special_tokens=False)["input_ids"])
    return list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def prompt_prefix_ids(lm: Any, prompt: str, end: int) -> list[int]:
    """Token ids the model sees up to character ``end`` of ``prompt`` (e.g. a subject's end inside the user turn).

    Raw prompts: ``prompt[:end]`` tokenised with special tokens, as ``prompt_ids`` does. Wrapped: the wrapped text
    up to that character, so the result is a prefix of ``prompt_ids(lm, prompt)`` up to tokenisation at the cut.
    """
    if not uses_chat_template(lm) or not prompt:
        return list(lm.tokenizer(prompt[:end], add_special_tokens=True)["input_ids"])
    wrapped = format_prompt(lm, prompt)
    start = wrapped.find(prompt)
    if start < 0:
        raise UserError(
            f"The chat template changes the text of the prompt '{prompt[:60]}', so a position inside it cannot "
            "be found; pass --chat-template none or give no subject."
        )
    return list(lm.tokenizer(wrapped[: start + end], add_special_tokens=False)["input_ids"])
