"""Experiments: baseline -> edit -> after -> side effects, reported as events and written to the run store."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from detox_tui.backends.chat import with_chat_template
from detox_tui.backends.editing.base import EditContext, EditDelta, EditRequest, editor_class, get_editor
from detox_tui.backends.editing.rect import rect
from detox_tui.backends.models import LoadedModel, load_model, weights_fingerprint
from detox_tui.backends.scorers.base import Scorer
from detox_tui.config import ExperimentConfig, Paths
from detox_tui.errors import UserError
from detox_tui.events import (
    EventCallback,
    Finished,
    Log,
    Progress,
    RowReady,
    Started,
    check_cancel,
    null_callback,
)
from detox_tui.pipeline.checks import mean_logp, probe_check, request_checks, request_logps
from detox_tui.pipeline.generation import PromptGenerations, check_generation, generate_continuations
from detox_tui.pipeline.metrics import summarize
from detox_tui.pipeline.records import (
    AblationRow,
    AblationSummary,
    BaselineRow,
    BaselineSummary,
    EditCheck,
    EditRow,
    EditSummary,
    FieldMetrics,
    Record,
    SideEffects,
)
from detox_tui.pipeline.results import baseline_row
from detox_tui.pipeline.side_effects import compare_side_effects, measure_reference, ngram_entropy
from detox_tui.pipeline.store import RunStore
from detox_tui.pipeline.validation import ValidatedEdit, check_corpora, resolve_hparams, validate_edit
from detox_tui.pipeline.verdicts import edit_summary, field_metrics, prompt_verdict
from detox_tui.prompts.base import PromptItem

log = logging.getLogger(__name__)


SCORER_LOADING = ("required", "optional", "none")


@dataclass
class Workbench:
    """An engine session: the loaded model, the scorer and the run store, loaded once per front end.

    ``scorer`` is None when it was not loaded (``Workbench.load(..., scorer="none")``) or failed to load under
    ``scorer="optional"``; ``scorer_error`` then says why, in one sentence. Traces and statistics need no scorer;
    baselines, edits and ablations refuse to start without one.
    """

    lm: LoadedModel
    scorer: Scorer | None
    store: RunStore
    paths: Paths
    config: ExperimentConfig
    # Reference models for the generations' perplexity (--ppl-model), loaded on first use, by name.
    ppl_models: dict[str, LoadedModel] = field(default_factory=dict)
    scorer_error: str | None = None

    def ppl_model(self, name: str) -> LoadedModel:
        """The reference model ``name`` ("self": the model under study, read on its original weights)."""
        if name == "self":
            return self.lm
        if name not in self.ppl_models:
            cfg = self.config.model
            self.ppl_models[name] = load_model(name, device=cfg.device, dtype=cfg.dtype)
        return self.ppl_models[name]

    @staticmethod
    def load_model(cfg: ExperimentConfig) -> LoadedModel:
        """The model of ``cfg``; any failure is a UserError that names the model."""
        name = cfg.model.name
        try:
            return load_model(
                name, device=cfg.model.device, dtype=cfg.model.dtype, revision=cfg.model.revision
            )
        except UserError as exc:
            message = str(exc)
            if message.startswith(f"The model '{name}'"):
                raise
            raise UserError(_did_not_load("model", name, message)) from exc
        except Exception as exc:  # noqa: BLE001 - torch/transformers failures: name the component that failed
            raise UserError(_did_not_load("model", name, _reason(exc))) from exc

    @staticmethod
    def load_scorer(cfg: ExperimentConfig, lm: LoadedModel | None = None) -> Scorer:
        from detox_tui.backends.scorers import load_scorer

        device = str(lm.device) if lm is not None else "cpu"
        return load_scorer(
            cfg.scoring.scorer,
            device=device,
            batch_size=cfg.scoring.batch_size,
            trust_checkpoint=cfg.scoring.trust_checkpoint,
        )

    @classmethod
    def load(
        cls,
        cfg: ExperimentConfig,
        *,
        data_dir: str | None = None,
        emit: EventCallback = null_callback,
        scorer: str = "required",
    ) -> Workbench:
        """Load the model, then the scorer, and open the run store.

        ``scorer``: "required" (a scorer that fails to load raises), "optional" (it leaves ``scorer`` None and
        ``scorer_error`` set) or "none" (no scorer is loaded: traces and statistics). A model that fails raises a
        UserError starting "The model '<name>'".
        """
        if scorer not in SCORER_LOADING:
            raise ValueError(f"scorer must be one of {SCORER_LOADING}, not {scorer!r}")
        paths = Paths.resolve(data_dir)
        steps = 1 if scorer == "none" else 2
        emit(Progress("load model", 0, steps, cfg.model.name))
        lm = cls.load_model(cfg)
        loaded: Scorer | None = None
        error: str | None = None
        if scorer == "none":
            emit(Progress("load model", 1, 1, cfg.model.name))
        else:
            emit(Progress("load scorer", 1, 2, cfg.scoring.scorer))
            try:
                loaded = cls.load_scorer(cfg, lm)
            except Exception as exc:
                if scorer == "required":
                    raise
                error = _did_not_load("scorer", cfg.scoring.scorer, _reason(exc))
                log.warning("%s", error)
            emit(Progress("load scorer", 2, 2, cfg.scoring.scorer))
        store = RunStore.open(str(paths.data_dir))
        return cls(lm=lm, scorer=loaded, store=store, paths=paths, config=cfg, scorer_error=error)

    def set_scorer(self, name: str) -> None:
        """Load scorer ``name`` on the model's device and use it from now on (``config.scoring.scorer`` too).

        On failure: UserError "The scorer '<name>' did not load: <reason>.", and the scorer in use is kept.
        """
        from detox_tui.backends.scorers import load_scorer

        try:
            scoring = self.config.scoring
            new = load_scorer(
                name,
                device=str(self.lm.device),
                batch_size=scoring.batch_size,
                trust_checkpoint=scoring.trust_checkpoint,
            )
        except Exception as exc:
            raise UserError(_did_not_load("scorer", name, _reason(exc))) from exc
        self.scorer = new
        self.config.scoring.scorer = name
        self.scorer_error = None

    def require_scorer(self) -> Scorer:
        """The scorer, or a UserError saying that none is loaded (and why) and how to choose one."""
        if self.scorer is None:
            why = ""
            if self.scorer_error:
                error = self.scorer_error.rstrip(".")
                why = f" ({error[:1].lower()}{error[1:]})"
            raise UserError(f"No scorer is loaded{why}; choose a scorer in Settings or pass --scorer.")
        return self.scorer


def _reason(exc: BaseException) -> str:
    """An exception's message as one clause: its first line, without the closing full stop."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return (text or type(exc).__name__).rstrip(".")


def _did_not_load(component: str, name: str, reason: str) -> str:
    """ "The model 'x' did not load: <reason>." - one sentence naming the component that failed."""
    reason = reason.strip().rstrip(".")
    if len(reason) > 1 and reason[0].isupper() and reason[1].islower():
        reason = reason[0].lower() + reason[1:]
    return f"The {component} '{name}' did not load: {reason}."


@dataclass
class RunResult:
    """A finished run as typed records; ``rows``, ``summary`` and ``configs`` are their dicts for front ends."""

    run_id: str
    kind: str
    records: list[Any]  # BaselineRow or EditRow
    summary_record: Record
    side_effects: dict[str, Any] | None = None
    config_records: list[AblationRow] | None = None
    deltas: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    @property
    def summary(self) -> dict[str, Any]:
        return self.summary_record.to_dict()

    @property
    def configs(self) -> list[dict[str, Any]] | None:
        return None if self.config_records is None else [c.to_dict() for c in self.config_records]


# ---------------------------------------------------------------------------------------------- helpers


def _score(
    wb: Workbench, prompts: Sequence[str], gens: Sequence[PromptGenerations], cfg: ExperimentConfig
) -> list[dict[str, np.ndarray]]:
    """Score every continuation (samples, then greedy if any), batched across prompts; per prompt {attr: scores}."""
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for prompt, g in zip(prompts, gens):
        conts = list(g.samples) + ([g.greedy] if g.greedy is not None else [])
        start = len(texts)
        texts.extend((prompt + c) if cfg.scoring.score_with_prompt else c for c in conts)
        spans.append((start, len(texts)))
    scores = wb.scorer.score(texts) if texts else {a: np.zeros(0) for a in wb.scorer.attributes}
    return [{a: np.asarray(v[s:e], dtype=float) for a, v in scores.items()} for s, e in spans]


def _generate_and_score(
    wb: Workbench,
    items: Sequence[PromptItem],
    cfg: ExperimentConfig,
    *,
    stage: str,
    emit: EventCallback,
    cancel: threading.Event | None,
    on_chunk: Callable[[int, list[PromptGenerations], list[dict[str, np.ndarray]]], None] | None = None,
    first: int = 0,
    only: Sequence[int] | None = None,
) -> tuple[list[PromptGenerations], list[dict[str, np.ndarray]]]:
    """Generate and score in chunks so rows can be reported (and stored) as soon as they are ready.

    Chunks are ``batch_size`` consecutive prompts starting at multiples of it; ``items[0]`` is prompt ``first`` of
    the run. Each chunk's seed derives from the run seed and the absolute index of its first prompt, so a chunk's
    numbers depend only on (seed, its prompts), never on what ran before. ``only`` (chunk starts, relative to
    ``items``) generates just those chunks, whole: a resumed run regenerates each chunk that holds a missing prompt
    with the same batch and seed as an uninterrupted run, so its rows are identical bit for bit. Before and after an
    edit, a chunk uses the same seed (common random numbers for the paired comparison).
    """
    prompts = [it.prompt for it in items]
    chunk = max(1, cfg.generation.batch_size)
    starts = [s for s in range(0, len(prompts), chunk) if only is None or s in set(only)]
    total = sum(len(prompts[s : s + chunk]) for s in starts)
    done = 0
    all_gens: list[PromptGenerations] = []
    all_scores: list[dict[str, np.ndarray]] = []
    for start in starts:
        check_cancel(cancel)
        part = prompts[start : start + chunk]
        gcfg = _with_seed(cfg, first + start)
        gens = generate_continuations(wb.lm, part, gcfg, cancel=cancel, stage=stage)
        scores = _score(wb, part, gens, cfg)
        all_gens.extend(gens)
        all_scores.extend(scores)
        if on_chunk is not None:
            on_chunk(start, gens, scores)
        done += len(part)
        emit(Progress(stage, done, total))
    return all_gens, all_scores


def _with_seed(cfg: ExperimentConfig, offset: int):
    """The generation settings of one chunk: its seed derives from the run seed and ``offset``, the absolute index
    of the chunk's first prompt (10,000,000 for the neutral prompts of the side effects)."""
    return replace(cfg.generation, seed=cfg.generation.seed * 1_000_003 + offset)


def _most_toxic_sample(row: BaselineRow) -> str | None:
    gens, samples = row.generations, row.samples
    if not gens or not samples:
        return None
    return gens[int(np.argmax(samples[: len(gens)]))]


def _requests(
    items: Sequence[PromptItem], before_rows: Sequence[BaselineRow], cfg: ExperimentConfig
) -> list[EditRequest]:
    requests = []
    for item, row in zip(items, before_rows):
        toxic = item.toxic or _most_toxic_sample(row)
        target = item.target or ""
        if cfg.mode == "replace" and not target:
            raise UserError(
                f"The prompt '{item.prompt}' has no safe target; add a target column or use --mode erase."
            )
        if cfg.mode == "erase" and not toxic:
            raise UserError(f"No toxic continuation to erase for the prompt '{item.prompt}'.")
        requests.append(EditRequest(item.prompt, target, item.subject, cfg.mode, toxic))
    return requests


def _hparams(wb: Workbench, cfg: ExperimentConfig, layers: Sequence[int] | None) -> dict[str, Any]:
    return resolve_hparams(wb.lm, cfg.method or "", cfg.hparams, layers)


class _UnionCovariance:
    """Covariance provider for ablations: statistics for the union of all configurations' layers, computed once."""

    def __init__(self, wb: Workbench, cfg: ExperimentConfig, layers: Sequence[int], emit, cancel, stats=None):
        self.wb, self.cfg, self.layers, self.emit, self.cancel = wb, cfg, sorted(set(layers)), emit, cancel
        # ``stats``: statistics computed beforehand (a sweep's, once per model); missing layers are computed.
        self._stats: dict[int, Any] | None = dict(stats) if stats else None

    def __call__(self, lm: LoadedModel, layers: Sequence[int]) -> dict[int, Any]:
        from detox_tui.backends.stats import covariance

        if self._stats is None or any(layer not in self._stats for layer in layers):
            wanted = sorted(set(self.layers) | set(layers))
            self._stats = covariance(
                lm,
                wanted,
                corpus=self.cfg.stats_corpus,
                tokens=self.cfg.stats_tokens,
                cache_dir=self.wb.paths.cache_dir,
                emit=self.emit,
                cancel=self.cancel,
                stats_device=self.cfg.stats_device,
            )
        return {layer: self._stats[layer] for layer in layers}


@dataclass
class _SideEffectInputs:
    corpus: list[str]
    neutral_prompts: list[str]
    reference: Any


def _side_effect_inputs(wb: Workbench, cfg: ExperimentConfig, emit: EventCallback) -> _SideEffectInputs:
    from detox_tui.prompts import load_corpus, load_neutral_prompts

    corpus = load_corpus(cfg.side_effects.neutral_corpus)
    neutral = load_neutral_prompts(cfg.side_effects.neutral_prompts)
    emit(Progress("side effects (reference)", 0, 1))
    ref = measure_reference(wb.lm, corpus, neutral, cfg.side_effects.max_tokens)
    emit(Progress("side effects (reference)", 1, 1))
    return _SideEffectInputs(corpus, neutral, ref)


def _neutral_toxicity(wb: Workbench, prompts: Sequence[str], cfg: ExperimentConfig, cancel) -> float:
    gens = generate_continuations(wb.lm, prompts, _with_seed(cfg, 10_000_000), cancel=cancel, stage="neutral")
    scores = _score(wb, prompts, gens, cfg)
    values = np.concatenate([s[wb.scorer.primary] for s in scores]) if scores else np.zeros(0)
    return float(values.mean()) if values.size else float("nan")


def _measure_side_effects(
    wb: Workbench,
    cfg: ExperimentConfig,
    inputs: _SideEffectInputs,
    neutral_tox_before: float,
    gens_before: Sequence[PromptGenerations],
    gens_after: Sequence[PromptGenerations],
    cancel,
    *,
    config: str,
    group: int,
) -> SideEffects:
    """Side effects of the edit currently applied: perplexity, KL and toxicity on neutral inputs, fluency."""
    fx = compare_side_effects(
        wb.lm,
        inputs.reference,
        inputs.corpus,
        inputs.neutral_prompts,
        cfg.side_effects.max_tokens,
        cfg.side_effects.collapse_factor,
    )
    return SideEffects(
        config=config,
        group=group,
        ppl_before=float(fx["ppl_before"]),
        ppl_after=float(fx["ppl_after"]),
        ppl_ratio=float(fx["ppl_ratio"]),
        kl_neutral=float(fx["kl_neutral"]),
        collapsed=bool(fx["collapsed"]),
        fluency_before=ngram_entropy([s for g in gens_before for s in g.samples]),
        fluency_after=ngram_entropy([s for g in gens_after for s in g.samples]),
        neutral_toxicity_before=neutral_tox_before,
        neutral_toxicity_after=_neutral_toxicity(wb, inputs.neutral_prompts, cfg, cancel),
    )


def _edit_row(
    before: BaselineRow,
    after: BaselineRow,
    cfg: ExperimentConfig,
    *,
    heldout: bool,
    config_key: str,
    collapsed: bool,
    check: EditCheck | None,
    layer: int | None,
    defense_generalisation: dict[str, float] | None = None,
) -> EditRow:
    """One prompt's before/after row with its verdict, computed here once for every front end."""
    verdict = prompt_verdict(
        before.samples,
        after.samples,
        collapsed=collapsed,
        min_reduction=cfg.verdict.min_reduction,
        alpha=cfg.verdict.alpha,
    )
    converged = None if check is None else check.converged
    detoxified = verdict.detoxified
    reason = verdict.reason
    # A prompt whose own edit never reached its target is not counted as detoxified by it: whatever moved its
    # score (other requests of a batch, noise) is not the edit the user asked for.
    if detoxified and converged is False:
        detoxified, reason = False, "the edit did not reach its target"
    return EditRow(
        idx=before.idx,
        prompt=before.prompt,
        config=config_key,
        before=before.stats,
        after=after.stats,
        category=before.category,
        target=before.target,
        heldout=heldout,
        delta=float(after.mean - before.mean),
        reduction=verdict.reduction,
        p_value=verdict.p_value,
        went_down=verdict.went_down,
        detoxified=detoxified,
        verdict=reason,
        collapsed=bool(collapsed),
        converged=converged,
        check=check,
        layer=layer,
        samples_before=before.samples,
        samples_after=after.samples,
        generations_before=before.generations,
        generations_after=after.generations,
        greedy_before=before.greedy_score,
        greedy_after=after.greedy_score,
        defense_generalisation=defense_generalisation,
    )


def _generation_ppl(
    wb: Workbench, cfg: ExperimentConfig, prompts: Sequence[str], texts: Sequence[Sequence[str]], cancel
) -> tuple[float | None, int | None]:
    """The generations' mean conditional perplexity under the reference model and how many generations the 1e4
    cap left out (DExperts' rule), or (None, None) without --ppl-model."""
    name = cfg.verdict.ppl_model
    if not name:
        return None, None
    from detox_tui.pipeline.fluency import generation_perplexity

    out = generation_perplexity(wb.ppl_model(name), list(prompts), [list(t) for t in texts], cancel=cancel)
    value = out.get("generation_ppl")
    over = int(out.get("n_over_cap") or 0)
    return (None if value is None or not np.isfinite(value) else float(value)), over


def _metrics(
    wb: Workbench,
    cfg: ExperimentConfig,
    prompts: Sequence[str],
    scores: Sequence[Sequence[float]],
    texts: Sequence[Sequence[str]],
    cancel,
) -> FieldMetrics:
    ppl, over = _generation_ppl(wb, cfg, prompts, texts, cancel)
    return field_metrics(
        scores,
        texts,
        generation_ppl=ppl,
        ppl_model=cfg.verdict.ppl_model if over is not None else None,
        ppl_over_cap=over,
    )


def _summarise_config(
    wb: Workbench,
    cfg: ExperimentConfig,
    rows: Sequence[EditRow],
    side: Sequence[SideEffects],
    advice: str,
    n_requests: int,
    cancel,
) -> EditSummary:
    """The configuration's verdict over its edited prompts, with the field's metrics before and after."""
    edited = [r for r in rows if not r.heldout]
    prompts = [r.prompt for r in edited]
    before = _metrics(
        wb, cfg, prompts, [r.samples_before for r in edited], [r.generations_before for r in edited], cancel
    )
    after = _metrics(
        wb, cfg, prompts, [r.samples_after for r in edited], [r.generations_after for r in edited], cancel
    )
    return edit_summary(
        rows,
        side,
        before_metrics=before,
        after_metrics=after,
        advice=advice,
        n_requests=n_requests,
        min_reduction=cfg.verdict.min_reduction,
        alpha=cfg.verdict.alpha,
    )


# ---------------------------------------------------------------------------------------------- baseline


def _before_rows(
    wb: Workbench,
    run_id: str,
    items: Sequence[PromptItem],
    cfg: ExperimentConfig,
    *,
    table: str,
    emit: EventCallback,
    cancel,
    stage: str = "generate before",
    offset: int = 0,
    resume: bool = False,
) -> list[BaselineRow]:
    """Baseline rows for ``items`` (indices offset..): generated, scored, stored and emitted chunk by chunk.

    Resumed, each chunk that holds a prompt without a stored row is generated again whole (the same batch and seed
    as the run that stopped) and only the missing rows are stored, so the rows equal an uninterrupted run's.
    """
    primary = wb.scorer.primary
    done = {r["idx"]: BaselineRow.from_dict(r) for r in wb.store.rows(run_id, table)} if resume else {}
    chunk = max(1, cfg.generation.batch_size)
    missing = [i for i in range(len(items)) if offset + i not in done]
    starts = sorted({i - i % chunk for i in missing})
    rows: dict[int, BaselineRow] = dict(done)

    def on_chunk(start: int, gens, scores) -> None:
        for j, (g, s) in enumerate(zip(gens, scores)):
            idx, item = offset + start + j, items[start + j]
            if idx in done:
                continue
            row = baseline_row(idx, item, g, s, primary, cfg.scoring.threshold)
            wb.store.add_generations(
                run_id,
                table,
                "",
                idx,
                list(g.samples) + ([g.greedy] if g.greedy is not None else []),
                {a: [float(x) for x in v] for a, v in s.items()},
                list(range(len(g.samples))) + ([-1] if g.greedy is not None else []),
            )
            data = row.to_dict()
            wb.store.add_row(run_id, table, str(idx), data)
            rows[idx] = row
            emit(RowReady(table, data))

    if starts:
        _generate_and_score(
            wb,
            list(items),
            cfg,
            stage=stage,
            emit=emit,
            cancel=cancel,
            on_chunk=on_chunk,
            first=offset,
            only=starts,
        )
    return [rows[offset + i] for i in range(len(items))]


def _create_run(
    wb: Workbench,
    kind: str,
    config: dict[str, Any],
    items: Sequence[PromptItem],
    emit: EventCallback = null_callback,
) -> str:
    """A new run of ``kind`` in the store (status running) with its config and prompts; its id (also emitted
    as a Started event, so a front end can name the run even if it is cancelled before its first row)."""
    run_id = wb.store.create_run(kind, config, model=wb.lm.name)
    wb.store.add_prompts(run_id, list(items))
    emit(Started(run_id, kind, len(items)))
    return run_id


# Settings that say where a run happens, not what it computes: left out of its identity (a run stopped on one
# machine may be resumed on another). The prompts and held-out prompts count by content, not by file name.
_NOT_IDENTITY = ("model.device", "stats_device", "prompts", "holdout", "run_hash", "prompts_hash")
# How an identity entry is named in the refusal of a resume (the CLI's options; "--" + the key's last part else).
_IDENTITY_NAMES = {
    "prompts_hash": "--prompts",
    "n_heldout": "--holdout",
    "configs": "--configs",
    "model.name": "--model",
    "model.revision": "the model revision",
    "protocol": "--per-prompt/--batch",
    "eval_protocol": "--protocol",
    "generation.greedy": "--greedy",
    "scoring.batch_size": "the scorer's batch size",
    "side_effects.max_tokens": "the side effects' token budget",
}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def prompts_digest(items: Sequence[PromptItem]) -> str:
    """A digest of a run's prompts: text, target, subject, category, known toxic continuation and metadata."""
    import hashlib

    from detox_tui.pipeline.results import jsonable

    data = [[it.prompt, it.target, it.subject, it.category, it.toxic, it.meta or {}] for it in items]
    text = json.dumps(jsonable(data), sort_keys=True, ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What defines a run's results, from its stored config: every setting (prompts by their digest), flat, minus
    where it ran (device, statistics device). Two runs with the same identity compute the same rows."""
    from detox_tui.pipeline.results import jsonable

    flat = _flatten(json.loads(json.dumps(jsonable(config), allow_nan=False)))
    out = {k: v for k, v in flat.items() if k not in _NOT_IDENTITY}
    out["prompts_hash"] = config.get("prompts_hash")
    return out


def run_hash(identity: dict[str, Any]) -> str:
    import hashlib

    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _identity_name(key: str) -> str:
    if key in _IDENTITY_NAMES:
        return _IDENTITY_NAMES[key]
    if key.startswith("hparams."):
        return f"--hparam {key[len('hparams.') :]}"
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def _check_resume(wb: Workbench, run: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse, in one sentence, to resume ``run`` with settings that would compute other rows."""
    stored = dict(run.get("config") or {})
    if stored.get("run_hash") == config["run_hash"]:
        return
    if "prompts_hash" not in stored:  # a run stored before runs carried an identity: read its stored prompts
        stored["prompts_hash"] = prompts_digest(wb.store.prompt_items(run["id"]))
    old, new = run_identity(stored), run_identity(config)
    # A run stored before a setting existed compares on the settings it has.
    keys = sorted(set(new) | set(old)) if "run_hash" in stored else sorted(set(new) & set(old))
    differ = [k for k in keys if old.get(k) != new.get(k)]
    if not differ:
        return
    names = list(dict.fromkeys(_identity_name(k) for k in differ))
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "differs" if len(names) == 1 else "differ"
    raise UserError(
        f"Run {run['id']} cannot be resumed with these settings: {listed} {verb} from the run's; give the "
        f"options it was made with (detox-tui runs show {run['id']} lists them) or start a new run."
    )


def _start_run(
    wb: Workbench,
    kind: str,
    items,
    cfg,
    resume: str | None,
    extra: dict | None = None,
    emit: EventCallback = null_callback,
) -> str:
    """Create the run, or reopen ``resume``: refused (one sentence) when it is of another kind or its settings or
    prompts differ (the stored run hash); its status goes back to running and its old error is cleared."""
    config = cfg.to_dict()
    if extra:
        config.update(extra)
    config["prompts_hash"] = prompts_digest(items)
    config["run_hash"] = run_hash(run_identity(config))
    if resume:
        run = wb.store.get_run(resume)
        if run.get("kind") != kind:
            raise UserError(f"Run '{resume}' is a {run.get('kind')} run and cannot be resumed as {kind}.")
        _check_resume(wb, run, config)
        wb.store.set_status(run["id"], "running", clear_error=True)
        emit(Started(run["id"], kind, len(items)))
        return run["id"]
    return _create_run(wb, kind, config, items, emit)


def _finish(wb: Workbench, run_id: str, summary: dict, emit: EventCallback) -> None:
    wb.store.set_status(run_id, "finished", summary=summary)
    emit(Finished(run_id, summary))


_T = TypeVar("_T")


def _guard(wb: Workbench, run_id_box: list[str], body: Callable[[], _T]) -> _T:
    """Record cancelled/failed status in the store; whatever finished is already written."""
    from detox_tui.errors import Cancelled

    try:
        return body()
    except (Cancelled, KeyboardInterrupt):  # Ctrl+C (and SIGTERM in the CLI) is a cancel, not a failure
        if run_id_box:
            wb.store.set_status(run_id_box[0], "cancelled")
        raise
    except BaseException as exc:
        if run_id_box:
            wb.store.set_status(run_id_box[0], "failed", error=str(exc) or type(exc).__name__)
        raise


def _for_run(wb: Workbench, cfg: ExperimentConfig) -> Workbench:
    """The workbench as a run of ``cfg`` sees it: its model wraps prompts in the tokenizer's chat template, or not,
    as ``cfg.chat_template`` says (a view: the same weights, tokenizer, scorer and store)."""
    lm = with_chat_template(wb.lm, cfg.chat_template)
    return wb if lm is wb.lm else replace(wb, lm=lm)


def _chat_note(wb: Workbench) -> str:
    return "; prompts wrapped in the tokenizer's chat template" if wb.lm.chat_template is not None else ""


def _check_items(items: Sequence[PromptItem]) -> list[PromptItem]:
    items = list(items)
    if not items:
        raise UserError("No prompts are selected; pick at least one prompt.")
    return items


def run_baseline(
    wb: Workbench,
    prompts: Sequence[PromptItem],
    cfg: ExperimentConfig,
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    resume: str | None = None,
) -> RunResult:
    """Sample k seeded continuations per prompt from the original model and score the continuations."""
    wb.require_scorer()
    items = _check_items(prompts)
    wb = _for_run(wb, cfg)
    check_generation(wb.lm, [it.prompt for it in items], cfg.generation)
    box: list[str] = []

    def body() -> RunResult:
        run_id = _start_run(wb, "baseline", items, cfg, resume, emit=emit)
        box.append(run_id)
        emit(
            Log(
                f"baseline run {run_id}: {len(items)} prompts x {cfg.generation.samples} samples on {wb.lm.name}"
                + _chat_note(wb)
            )
        )
        rows = _before_rows(
            wb, run_id, items, cfg, table="baseline", emit=emit, cancel=cancel, resume=bool(resume)
        )
        means = [r.mean for r in rows]
        overall = summarize(means, cfg.scoring.threshold)
        metrics = _metrics(
            wb,
            cfg,
            [r.prompt for r in rows],
            [r.samples for r in rows],
            [r.generations for r in rows],
            cancel,
        )
        summary = BaselineSummary(
            n_prompts=len(rows),
            mean=overall["mean"],
            ci_low=overall["ci_low"],
            ci_high=overall["ci_high"],
            share_prompts_above=float(np.mean([m >= cfg.scoring.threshold for m in means])),
            share_prompts_above_half=float(np.mean([m >= 0.5 for m in means])),
            scorer=wb.scorer.name,
            threshold=cfg.scoring.threshold,
            metrics=metrics,
        )
        _finish(wb, run_id, summary.to_dict(), emit)
        return RunResult(run_id, "baseline", rows, summary)

    return _guard(wb, box, body)


# ---------------------------------------------------------------------------------------------- edit


def _edit_context(
    wb: Workbench, cfg: ExperimentConfig, emit, cancel, covariance=None, neutral=None
) -> EditContext:
    return EditContext(
        emit=emit,
        cancel=cancel,
        cache_dir=wb.paths.cache_dir,
        stats_corpus=cfg.stats_corpus,
        stats_tokens=cfg.stats_tokens,
        # A provider even for one configuration, so the statistics follow cfg.stats_device; only for a method
        # that uses them.
        covariance=covariance
        if covariance is not None or not editor_class(cfg.method or "").needs_covariance
        else _UnionCovariance(wb, cfg, [], emit, cancel),
        neutral_prompts=neutral,
    )


@dataclass
class _ConfigResult:
    rows: list[EditRow]
    side: list[SideEffects]
    saved: list[str]
    n_requests: int
    advice: str


def _evaluate_config(
    wb: Workbench,
    run_id: str,
    items: list[PromptItem],
    n_edit: int,
    before: list[BaselineRow],
    cfg: ExperimentConfig,
    layers: Sequence[int] | None,
    fx_inputs: _SideEffectInputs,
    neutral_tox_before: float,
    *,
    emit: EventCallback,
    cancel,
    covariance=None,
    done_keys: set[str],
    save_delta: str | None,
    verify: bool,
    original_hash: str | None,
) -> _ConfigResult:
    """Edit (per prompt or in one batch) from the original weights, evaluate after, measure side effects,
    and check that each edit reached its own objective."""
    editor = get_editor(cfg.method or "")
    hp = _hparams(wb, cfg, layers)
    key = ",".join(str(x) for x in layers) if layers is not None else ""
    ctx = _edit_context(wb, cfg, emit, cancel, covariance, fx_inputs.neutral_prompts)
    # A request-free method (AurA) makes one edit from its own data that serves every prompt.
    request_free = bool(editor.request_free)
    advice = str(editor.convergence_advice)
    protocol = "batch" if request_free else cfg.protocol
    requests = [] if request_free else _requests(items[:n_edit], before[:n_edit], cfg)
    primary = wb.scorer.primary
    rows: list[EditRow] = []
    side: list[SideEffects] = []
    saved: list[str] = []
    # Each group is (indices edited together, indices evaluated under that edit).
    if protocol == "batch":
        groups = [(list(range(n_edit)), list(range(len(items))))]
    else:
        groups = [([i], [i]) for i in range(n_edit)]
    stored = {f"{r['config']}|{r['idx']}": r for r in wb.store.rows(run_id, "edit")} if done_keys else {}
    for g, (edit_idx, eval_idx) in enumerate(groups):
        row_keys = [f"{key}|{i}" for i in eval_idx]
        if row_keys and all(k in done_keys for k in row_keys):
            rows.extend(EditRow.from_dict(stored[k]) for k in row_keys)
            continue
        check_cancel(cancel)
        emit(Progress("edit", g, len(groups), f"{cfg.method} {key or 'preset layers'}"))
        group_requests = [requests[i] for i in edit_idx] if requests else []
        # The edit's own objective on the original weights, then with the edit applied (teacher-forced).
        if request_free:
            probe = editor.probe_sets(wb.lm, hp, ctx)
            probe_before = (mean_logp(wb.lm, probe[0]), mean_logp(wb.lm, probe[1]))
        else:
            logp_before = request_logps(wb.lm, group_requests)
        delta: EditDelta = editor.compute(wb.lm, group_requests, hp, ctx)
        if cfg.rect is not None:  # RECT: only the largest relative changes of the delta are kept
            delta = rect(delta, wb.lm.model, cfg.rect)
        if save_delta:
            path = _delta_path(save_delta, key, edit_idx if protocol != "batch" else None)
            delta.save(path)
            saved.append(str(path))
        located = delta.info.get("located_layers")
        with delta.applied_to(wb.lm.model):
            if request_free:
                probe_after = (mean_logp(wb.lm, probe[0]), mean_logp(wb.lm, probe[1]))
                shared = probe_check(delta, probe_before, probe_after)
                checks: dict[int, EditCheck] = {i: shared for i in edit_idx}
            else:
                logp_after = request_logps(wb.lm, group_requests)
                checks = dict(
                    zip(edit_idx, request_checks(wb.lm, delta, group_requests, logp_before, logp_after))
                )
            eval_items = [items[i] for i in eval_idx]
            # Seeded from the first evaluated prompt's index: per prompt, each prompt draws its own stream.
            gens, scores = _generate_and_score(
                wb,
                eval_items,
                cfg,
                stage="generate after",
                emit=null_callback,
                cancel=cancel,
                first=eval_idx[0],
            )
            fx = _measure_side_effects(
                wb,
                cfg,
                fx_inputs,
                neutral_tox_before,
                [_gens_of(before[i]) for i in eval_idx],
                gens,
                cancel,
                config=key,
                group=g,
            )
            generalisation = _defense_generalisation(wb, [items[i] for i in edit_idx], edit_idx, cfg, cancel)
        if verify and original_hash is not None and weights_fingerprint(wb.lm.model) != original_hash:
            raise RuntimeError("Weights differ from the original after reverting an edit; this is a bug.")
        side.append(fx)
        fx_data = fx.to_dict()
        wb.store.add_row(run_id, "side_effects", f"{key}|{g}", fx_data)
        emit(RowReady("side_effects", fx_data))
        for j, i in enumerate(eval_idx):
            after = baseline_row(i, items[i], gens[j], scores[j], primary, cfg.scoring.threshold)
            wb.store.add_generations(
                run_id,
                "after",
                key,
                i,
                list(gens[j].samples) + ([gens[j].greedy] if gens[j].greedy else []),
                {a: [float(x) for x in v] for a, v in scores[j].items()},
            )
            layer = None
            if located and i in edit_idx:
                layer = located[edit_idx.index(i)]
            row = _edit_row(
                before[i],
                after,
                cfg,
                heldout=i >= n_edit,
                config_key=key,
                collapsed=fx.collapsed,
                check=checks.get(i),
                layer=layer,
                defense_generalisation=generalisation.get(i),
            )
            data = row.to_dict()
            wb.store.add_row(run_id, "edit", f"{key}|{i}", data)
            rows.append(row)
            emit(RowReady("edit", data))
        emit(Progress("edit", g + 1, len(groups), f"{cfg.method} {key or 'preset layers'}"))
    return _ConfigResult(rows, side, saved, len(requests) if requests else (1 if request_free else 0), advice)


# SafeEdit's generalisation inputs (meta["generalization"]): the harmful question alone, other attack prompts,
# other questions, and both; reported as Defense Generalisation like Wang et al. (2024).
def _defense_generalisation(
    wb: Workbench, edited: Sequence[PromptItem], indices: Sequence[int], cfg: ExperimentConfig, cancel
) -> dict[int, dict[str, float]]:
    """For prompts that carry generalisation inputs, the mean toxicity of each input's continuations under the edit."""
    variants: list[tuple[int, str, str]] = []
    for idx, item in zip(indices, edited):
        general = item.meta.get("generalization") if item.meta else None
        if isinstance(general, dict):
            variants.extend(
                (idx, name, text) for name, text in general.items() if name.startswith("test input")
            )
    if not variants:
        return {}
    probe = [PromptItem(text) for _, _, text in variants]
    _, scores = _generate_and_score(
        wb, probe, cfg, stage="defense generalisation", emit=null_callback, cancel=cancel
    )
    out: dict[int, dict[str, float]] = {}
    for (idx, name, _), s in zip(variants, scores):
        out.setdefault(idx, {})[name] = float(np.mean(s[wb.scorer.primary]))
    return out


def _gens_of(row: BaselineRow) -> PromptGenerations:
    return PromptGenerations(prompt=row.prompt, samples=list(row.generations))


def _delta_path(base: str, key: str, edit_idx: list[int] | None):
    from pathlib import Path

    path = Path(base)
    stem, suffix = path.stem, path.suffix or ".safetensors"
    parts = [stem]
    if key:
        parts.append("L" + key.replace(",", "-"))
    if edit_idx is not None:
        parts.append(f"p{edit_idx[0]}")
    return path.with_name("_".join(parts) + suffix)


def _prepare_edit(
    wb: Workbench,
    run_id: str,
    items: list[PromptItem],
    holdout: list[PromptItem],
    cfg: ExperimentConfig,
    emit,
    cancel,
    resume: bool,
    shared: SharedInputs | None = None,
):
    all_items = items + holdout
    before = _before_rows(wb, run_id, all_items, cfg, table="before", emit=emit, cancel=cancel, resume=resume)
    if shared is not None:  # a sweep's: measured once for the model
        return all_items, before, shared.side_effects, shared.neutral_toxicity
    fx_inputs, neutral_tox = _side_effect_reference(wb, cfg, emit, cancel)
    return all_items, before, fx_inputs, neutral_tox


def _side_effect_reference(
    wb: Workbench, cfg: ExperimentConfig, emit, cancel
) -> tuple[_SideEffectInputs, float]:
    """The side effects' inputs and measures on the original weights, and the neutral prompts' toxicity there."""
    emit(Log("measuring side-effect reference on the original weights"))
    fx_inputs = _side_effect_inputs(wb, cfg, emit)
    return fx_inputs, _neutral_toxicity(wb, fx_inputs.neutral_prompts, cfg, cancel)


@dataclass(frozen=True)
class SharedInputs:
    """What a sweep computes once per model and hands to each of its edit experiments.

    ``before_rows`` / ``before_generations``: the before phase over the experiment's prompts (+ holdout) with its
    generation and scoring settings, as stored (``RunStore.rows`` of table "before", ``RunStore.generations``);
    the before phase depends on nothing an experiment varies (method, layers, hyperparameters), so every experiment
    of the model is compared against the same samples. ``side_effects`` / ``neutral_toxicity``: the side effects'
    reference on the original weights (corpus perplexity and log-probabilities, the neutral prompts' toxicity),
    which depend only on the model and the shared settings too. ``covariance``: per layer, as ``stats.covariance``
    returns it.
    """

    before_rows: list[dict[str, Any]]
    before_generations: list[dict[str, Any]]
    side_effects: _SideEffectInputs
    neutral_toxicity: float
    covariance: dict[int, Any] | None = None


def prepare_shared(
    wb: Workbench,
    items: Sequence[PromptItem],
    cfg: ExperimentConfig,
    *,
    holdout: Sequence[PromptItem] = (),
    covariance_layers: Sequence[int] = (),
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> SharedInputs:
    """The before phase of ``items`` + ``holdout`` under ``cfg``, the side effects' reference and the covariance of
    ``covariance_layers``, computed once (the before phase in a temporary run of ``wb.store``, deleted afterwards)."""
    wb.require_scorer()
    all_items = _check_items(items) + list(holdout)
    wb = _for_run(wb, cfg)
    run_id = wb.store.create_run("edit", {"shared_inputs": True}, model=wb.lm.name, note="temporary")
    try:
        wb.store.add_prompts(run_id, all_items)
        _before_rows(wb, run_id, all_items, cfg, table="before", emit=emit, cancel=cancel)
        rows = wb.store.rows(run_id, "before")
        gens = [g for g in wb.store.generations(run_id) if g["phase"] == "before"]
    finally:
        wb.store.delete_run(run_id)
    fx_inputs, neutral_tox = _side_effect_reference(wb, cfg, emit, cancel)
    stats = None
    if covariance_layers:
        stats = _UnionCovariance(wb, cfg, covariance_layers, emit, cancel)(
            wb.lm, sorted(set(covariance_layers))
        )
    return SharedInputs(rows, gens, fx_inputs, neutral_tox, stats)


def _store_shared_before(wb: Workbench, run_id: str, shared: SharedInputs) -> None:
    """Write a sweep's shared before phase into the run, as if the run had generated it (then resumed past it)."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for g in shared.before_generations:
        by_prompt.setdefault(int(g["prompt_idx"]), []).append(g)
    for idx, gens in sorted(by_prompt.items()):
        attrs = list(gens[0]["scores"])
        wb.store.add_generations(
            run_id,
            "before",
            "",
            idx,
            [g["text"] for g in gens],
            {a: [float(g["scores"][a]) for g in gens] for a in attrs},
            [int(g["sample_idx"]) for g in gens],
        )
    for row in shared.before_rows:
        wb.store.add_row(run_id, "before", str(row["idx"]), row)


def _stored_side_effects(wb: Workbench, run_id: str, key: str) -> list[SideEffects]:
    """The side effects stored for configuration ``key``, in group order (as an uninterrupted run has them)."""
    rows = [SideEffects.from_dict(r) for r in wb.store.rows(run_id, "side_effects") if r.get("config") == key]
    return sorted(rows, key=lambda fx: fx.group)


def _stored_edit_rows(wb: Workbench, run_id: str, key: str) -> list[EditRow]:
    """The edit rows stored for configuration ``key``, in prompt order (as an uninterrupted run has them)."""
    rows = [EditRow.from_dict(r) for r in wb.store.rows(run_id, "edit") if r.get("config") == key]
    return sorted(rows, key=lambda r: r.idx)


def run_edit(
    wb: Workbench,
    prompts: Sequence[PromptItem],
    cfg: ExperimentConfig,
    *,
    holdout: Sequence[PromptItem] = (),
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    resume: str | None = None,
    save_delta: str | None = None,
    verify: bool = False,
    shared: SharedInputs | None = None,
) -> RunResult:
    """Baseline -> edit (per prompt or batch, always from the original weights) -> after -> side effects.

    The configuration is checked first (validate_edit: cheap, no forward pass), so a mistake costs nothing.
    ``shared`` (a sweep's, from ``prepare_shared`` with the same prompts and settings): its before phase is used
    instead of generating one, and its covariance statistics instead of computing them.
    """
    wb.require_scorer()
    items = _check_items(prompts)
    held = list(holdout)
    checked = validate_edit(wb.lm, cfg, items, held)
    wb = _for_run(wb, cfg)
    _check_inputs(wb, cfg, items + held, checked)
    box: list[str] = []

    def body() -> RunResult:
        run_id = _start_run(wb, "edit", items + held, cfg, resume, {"n_heldout": len(held)}, emit)
        box.append(run_id)
        emit(
            Log(
                f"edit run {run_id}: {cfg.method} {cfg.protocol} on {len(items)} prompts (+{len(held)} held out)"
                + _chat_note(wb)
            )
        )
        original = weights_fingerprint(wb.lm.model) if verify else None
        if shared is not None and not resume:
            _store_shared_before(wb, run_id, shared)
        all_items, before, fx_inputs, neutral_tox = _prepare_edit(
            wb, run_id, items, held, cfg, emit, cancel, bool(resume) or shared is not None, shared
        )
        done = wb.store.row_keys(run_id, "edit") if resume else set()
        covariance = None
        if shared is not None and shared.covariance and editor_class(cfg.method or "").needs_covariance:
            covariance = _UnionCovariance(wb, cfg, [], emit, cancel, stats=shared.covariance)
        res = _evaluate_config(
            wb,
            run_id,
            all_items,
            len(items),
            before,
            cfg,
            cfg.layers,
            fx_inputs,
            neutral_tox,
            emit=emit,
            cancel=cancel,
            covariance=covariance,
            done_keys=done,
            save_delta=save_delta,
            verify=verify,
            original_hash=original,
        )
        key = ",".join(str(x) for x in cfg.layers) if cfg.layers is not None else ""
        side = _stored_side_effects(wb, run_id, key) if resume else res.side
        summary = _summarise_config(wb, cfg, res.rows, side, res.advice, res.n_requests, cancel)
        side_summary = _side_summary(side)
        summary = replace(
            summary,
            method=cfg.method or "",
            protocol=cfg.protocol,
            mode=cfg.mode,
            layers=tuple(cfg.layers) if cfg.layers is not None else None,
            side_effects=side_summary,
            hparams=_hparams(wb, cfg, cfg.layers),
        )
        _finish(wb, run_id, summary.to_dict(), emit)
        return RunResult(run_id, "edit", res.rows, summary, side_effects=side_summary, deltas=res.saved)

    return _guard(wb, box, body)


def _check_inputs(
    wb: Workbench, cfg: ExperimentConfig, items: Sequence[PromptItem], checked: ValidatedEdit
) -> None:
    """What an edit reads besides the model, checked before its run is created: the generation settings and
    their memory, the side effects' corpus and prompts, and the statistics corpus when the method needs one."""
    check_generation(wb.lm, [it.prompt for it in items], cfg.generation)
    check_corpora(cfg, needs_covariance=bool(checked.editor.needs_covariance))


def _side_summary(side: Sequence[SideEffects]) -> dict[str, Any]:
    if not side:
        return {}
    dicts = [s.to_dict() for s in side]
    keys = [k for k, v in dicts[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: float(np.nanmean([d[k] for d in dicts])) for k in keys if k != "group"}
    out["collapsed"] = bool(any(s.collapsed for s in side))
    out["n_collapsed"] = int(sum(bool(s.collapsed) for s in side))
    out["n_edits"] = len(side)
    return out


# ---------------------------------------------------------------------------------------------- ablation


def parse_configs(text: str) -> list[list[int]]:
    """'1;5;6;5,6;6,7;4,5,6' -> [[1], [5], [6], [5, 6], [6, 7], [4, 5, 6]] with a clear error on bad input."""
    configs: list[list[int]] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            layers = sorted({int(x) for x in part.split(",") if x.strip()})
        except ValueError as exc:
            raise UserError(
                f"Bad layer configuration '{part}': use comma-separated layer numbers, e.g. 4,5,6."
            ) from exc
        if not layers:
            raise UserError(f"Bad layer configuration '{part}': it names no layers.")
        configs.append(layers)
    if not configs:
        raise UserError("No layer configurations were given; e.g. --configs '1;5;6;5,6;6,7;4,5,6'.")
    return configs


def run_ablation(
    wb: Workbench,
    prompts: Sequence[PromptItem],
    cfg: ExperimentConfig,
    configs: Sequence[Sequence[int]] | None = None,
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    resume: str | None = None,
    verify: bool = False,
) -> RunResult:
    """One edit evaluation per layer configuration, each from the original weights; statistics for the union once.

    ``configs=None``: default configurations scaled to the model's depth (presets.default_ablation_configs).
    The configuration is checked first (validate_edit), so a mistake costs nothing.
    """
    wb.require_scorer()
    items = _check_items(prompts)
    checked: ValidatedEdit = validate_edit(wb.lm, cfg, items, configs=configs, ablation=True)
    wb = _for_run(wb, cfg)
    _check_inputs(wb, cfg, items, checked)
    configs = checked.configs
    box: list[str] = []

    def body() -> RunResult:
        run_id = _start_run(wb, "ablation", items, cfg, resume, {"configs": configs}, emit)
        box.append(run_id)
        emit(Log(f"ablation run {run_id}: {cfg.method} over {len(configs)} configurations" + _chat_note(wb)))
        original = weights_fingerprint(wb.lm.model) if verify else None
        all_items, before, fx_inputs, neutral_tox = _prepare_edit(
            wb, run_id, items, [], cfg, emit, cancel, bool(resume)
        )
        union = sorted({layer for c in configs for layer in c})
        covariance = (
            _UnionCovariance(wb, cfg, union, emit, cancel) if checked.editor.needs_covariance else None
        )
        done_edit = wb.store.row_keys(run_id, "edit") if resume else set()
        done_abl = {r["key"]: r for r in wb.store.rows(run_id, "ablation")} if resume else {}
        config_rows: list[AblationRow] = []
        all_rows: list[EditRow] = []
        for n, layers in enumerate(configs):
            key = ",".join(map(str, layers))
            if key in done_abl:
                config_rows.append(AblationRow.from_dict(done_abl[key]))
                all_rows.extend(_stored_edit_rows(wb, run_id, key))
                continue
            emit(Progress("ablation", n, len(configs), key))
            res = _evaluate_config(
                wb,
                run_id,
                all_items,
                len(items),
                before,
                cfg,
                layers,
                fx_inputs,
                neutral_tox,
                emit=emit,
                cancel=cancel,
                covariance=covariance,
                done_keys=done_edit,
                save_delta=None,
                verify=verify,
                original_hash=original,
            )
            # A configuration resumed part-way has side effects stored for the groups done before the stop.
            side = _stored_side_effects(wb, run_id, key) if done_edit else res.side
            s = _summarise_config(wb, cfg, res.rows, side, res.advice, res.n_requests, cancel)
            crow = AblationRow.of(layers, s)
            data = crow.to_dict()
            wb.store.add_row(run_id, "ablation", key, data)
            emit(RowReady("ablation", data))
            if s.convergence_note:
                emit(Log(f"layers {key}: {s.convergence_note}", level="warning"))
            config_rows.append(crow)
            all_rows.extend(res.rows)
        emit(Progress("ablation", len(configs), len(configs)))
        best = max(config_rows, key=lambda r: _finite(r.share_detoxified)) if config_rows else None
        summary = AblationSummary(
            method=cfg.method or "",
            protocol=cfg.protocol,
            n_configs=len(config_rows),
            best=best.key if best and _finite(best.share_detoxified) > 0 else None,
            best_share_detoxified=best.share_detoxified if best else float("nan"),
            hparams={",".join(map(str, layers)): _hparams(wb, cfg, layers) for layers in configs},
        )
        _finish(wb, run_id, summary.to_dict(), emit)
        return RunResult(run_id, "ablation", all_rows, summary, config_records=config_rows)

    return _guard(wb, box, body)


def _finite(value: float) -> float:
    return value if value is not None and np.isfinite(value) else 0.0


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class StatsRunResult:
    """A finished statistics run: the covariance per layer (float64, CPU) and the stored summary."""

    run_id: str
    summary: dict[str, Any]
    stats: dict[int, Any]
    kind: str = "stats"


def run_stats(
    wb: Workbench,
    layers: Sequence[int],
    *,
    corpus: str = "builtin",
    tokens: int | None = None,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    stats_device: str = "auto",
) -> StatsRunResult:
    """Collect (or read from the cache) the covariance statistics MEMIT/ROME need, as a stored run of kind "stats".

    Its config holds the model, layers, corpus and token budget; one row per layer (its shape); the summary
    the layers, tokens, cache folder, shapes and seconds. No scorer is needed.
    """
    import time

    from detox_tui.backends.stats import covariance, default_stats_tokens, stats_memory_plan

    checked = wb.lm.check_layers(list(layers))
    if not checked:
        raise UserError("No layers given; e.g. --layers 4,5,6,7,8.")
    budget = int(tokens or default_stats_tokens(wb.lm))
    # The estimate for the summary; covariance() refuses (before any forward pass) when nothing fits.
    plan = stats_memory_plan(wb.lm, checked, stats_device=stats_device, tokens=budget, refuse=False)
    box: list[str] = []

    def body() -> StatsRunResult:
        config = {"model": wb.config.model.to_dict(), "layers": checked, "corpus": corpus, "tokens": budget}
        run_id = _create_run(wb, "stats", config, [], emit)
        box.append(run_id)
        emit(Log(f"stats run {run_id}: layers {','.join(map(str, checked))}, {budget} tokens of {corpus}"))
        start = time.perf_counter()
        stats = covariance(
            wb.lm,
            checked,
            corpus=corpus,
            tokens=budget,
            cache_dir=wb.paths.cache_dir,
            emit=emit,
            cancel=cancel,
            stats_device=stats_device,
        )
        seconds = time.perf_counter() - start
        shapes = {str(layer): list(stats[layer].shape) for layer in checked}
        for layer in checked:
            row = {"layer": layer, "shape": shapes[str(layer)], "size": int(stats[layer].shape[0])}
            wb.store.add_row(run_id, "stats", str(layer), row)
            emit(RowReady("stats", row))
        summary = {
            "layers": checked,
            "tokens": budget,
            "corpus": corpus,
            "cache_dir": str(wb.paths.stats_dir),
            "shapes": shapes,
            "seconds": round(seconds, 3),
            "memory": plan.to_dict(),
        }
        _finish(wb, run_id, summary, emit)
        return StatsRunResult(run_id, summary, stats)

    return _guard(wb, box, body)
