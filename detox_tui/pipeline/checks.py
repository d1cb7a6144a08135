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


def request_logps(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[float]:
    """Mean per-token log-probability of each request's objective continuation after its bare prompt."""
    if not requests:
        return []
    conts = [objective_of(r)[1] for r in requests]
    values = continuation_logprob(lm, [r.prompt for r in requests], conts)
    return [float(v) for v in values]


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
    delta: EditDelta,
    requests: Sequence[EditRequest],
    logp_before: Sequence[float],
    logp_after: Sequence[float],
) -> list[EditCheck]:
    """One EditCheck per request: objective before/after, the method's final loss and steps, converged."""
    n = len(requests)
    losses = _per_request(delta.info, "request_loss", n)
    steps = _per_request(delta.info, "request_steps", n)
    out = []
    for req, b, a, loss, step in zip(requests, logp_before, logp_after, losses, steps):
        objective = objective_of(req)[0]
        out.append(
            EditCheck(
                objective=objective,
                logp_before=float(b),
                logp_after=float(a),
                converged=reached(objective, float(b), float(a)),
                final_loss=None if loss is None else float(loss),
                steps=None if step is None else int(step),
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
        control_logp_before=ctl_b,
        control_logp_after=ctl_a,
    )
