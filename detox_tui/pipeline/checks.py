"""Did the edit take? Each edit's own objective, teacher-forced, on the original and on the edited weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from detox_tui.backends.editing.base import EditDelta, EditRequest
from detox_tui.backends.models import LoadedModel
from detox_tui.pipeline.generation import continuation_logprob
from detox_tui.pipeline.records import EditCheck, reached


def objective_of(request: EditRequest) -> tuple[str, str]:
    """(objective name, continuation) an edit request optimises: its safe target, or the toxic text to erase."""
    if request.mode == "erase":
        return "toxic", request.toxic or ""
    return "target", request.target


def n_tokens(lm: LoadedModel, text: str) -> int:
    """How many tokens ``continuation_logprob`` scores for a continuation."""
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def request_logps(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[tuple[float, float | None]]:
    """Per request, the mean per-token log-probability after its bare prompt of (its objective continuation,
    the toxic continuation a replace edit competes with, or None)."""
    if not requests:
        return []
    prompts, conts, slots = [], [], []
    for r in requests:
        prompts.append(r.prompt)
        conts.append(objective_of(r)[1])
        if r.mode == "replace" and r.toxic:
            prompts.append(r.prompt)
            conts.append(r.toxic)
            slots.append(True)
        else:
            slots.append(False)
    values = [float(v) for v in continuation_logprob(lm, prompts, conts)]
    out, i = [], 0
    for has_rival in slots:
        out.append((values[i], values[i + 1] if has_rival else None))
        i += 2 if has_rival else 1
    return out


def mean_logp(lm: LoadedModel, texts: Sequence[str]) -> float:
    """Mean over ``texts`` of their mean per-token log-probability (each read from the start of a document)."""
    if not texts:
        return float("nan")
    values = [float(v) for v in continuation_logprob(lm, [""] * len(texts), list(texts))]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _per_request(info: dict[str, Any], key: str, n: int) -> list[Any]:
    values = info.get(key)
    if isinstance(values, (list, tuple)) and len(values) == n:
        return list(values)
    return [None] * n


def request_checks(
    lm: LoadedModel,
    delta: EditDelta,
    requests: Sequence[EditRequest],
    before: Sequence[tuple[float, float | None]],
    after: Sequence[tuple[float, float | None]],
) -> list[EditCheck]:
    """One EditCheck per request: objective (and rival) before/after, the method's final loss and steps."""
    n = len(requests)
    losses = _per_request(delta.info, "request_loss", n)
    steps = _per_request(delta.info, "request_steps", n)
    out = []
    for req, (b, rival_b), (a, rival_a), loss, step in zip(requests, before, after, losses, steps):
        objective, text = objective_of(req)
        n = n_tokens(lm, text)
        rival_n = n_tokens(lm, req.toxic) if rival_a is not None and req.toxic else None
        out.append(
            EditCheck(
                objective=objective,
                logp_before=b,
                logp_after=a,
                converged=reached(objective, b, a, rival_a, n, rival_n),
                n_tokens=n,
                rival_n_tokens=rival_n,
                final_loss=None if loss is None else float(loss),
                steps=None if step is None else int(step),
                rival_logp_before=rival_b,
                rival_logp_after=rival_a,
            )
        )
    return out


def probe_check(
    delta: EditDelta,
    probe_before: tuple[float, float],
    probe_after: tuple[float, float],
) -> EditCheck:
    """A request-free edit (AurA): it took when it dampened units and lowered the toxic probe sentences'
    log-probability by more than the non-toxic control sentences' (the edit is selective, not just damage)."""
    (tox_b, ctl_b), (tox_a, ctl_a) = probe_before, probe_after
    units = int(delta.info.get("n_dampened", 0) or 0)
    finite = all(math.isfinite(x) for x in (tox_b, ctl_b, tox_a, ctl_a))
    converged = bool(units > 0 and finite and (tox_a - tox_b) < (ctl_a - ctl_b) and tox_a < tox_b)
    return EditCheck(
        objective="toxic sentences",
        logp_before=tox_b,
        logp_after=tox_a,
        converged=converged,
        units_dampened=units,
        rival_logp_before=ctl_b,
        rival_logp_after=ctl_a,
    )
