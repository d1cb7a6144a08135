"""Batched, seeded generation of continuations (prompt tokens stripped) and teacher-forced log-probabilities."""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from detox_tui.backends.chat import prompt_ids
from detox_tui.backends.models import LoadedModel, pad_batch
from detox_tui.config import GenerationConfig
from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Progress, check_cancel, null_callback

log = logging.getLogger(__name__)


@dataclass
class PromptGenerations:
    """The continuations of one prompt: ``samples`` seeded samples, plus the greedy one when asked for."""

    prompt: str
    samples: list[str] = field(default_factory=list)
    greedy: str | None = None


def context_length(lm: LoadedModel) -> int | None:
    """The model's maximum number of positions, or None when its config does not say."""
    cfg = lm.model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def batch_seed(seed: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed for one batch, derived only from the run seed and the batch's index."""
    state = np.random.SeedSequence([seed % 2**64, batch_index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _encode(lm: LoadedModel, text: str, *, special: bool = True) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=special)["input_ids"])


def _prompt_ids(lm: LoadedModel, prompt: str, room: int | None) -> list[int]:
    """Token ids the model sees for a prompt (wrapped in its chat template when the run uses one; BOS/EOS for an
    empty one), cut from the left to leave room for the continuation."""
    ids = prompt_ids(lm, prompt)
    if not ids:
        bos = lm.tokenizer.bos_token_id
        ids = [bos if bos is not None else lm.tokenizer.eos_token_id]
    if room is not None and len(ids) > room:
        ids = ids[len(ids) - room :]
    return ids


def _check_config(cfg: GenerationConfig, ctx: int | None) -> None:
    if cfg.samples < 0:
        raise UserError(f"The number of samples must be 0 or more, not {cfg.samples}.")
    if cfg.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {cfg.max_new_tokens}.")
    if cfg.samples > 0 and cfg.temperature <= 0:
        raise UserError(
            f"The temperature must be above 0 (got {cfg.temperature}); use the greedy option instead."
        )
    if cfg.samples > 0 and not 0 < cfg.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], not {cfg.top_p}.")
    if cfg.top_k < 0:
        raise UserError(f"top_k must be 0 (off) or more, not {cfg.top_k}.")
    if ctx is not None and cfg.max_new_tokens >= ctx:
        raise UserError(
            f"max_new_tokens ({cfg.max_new_tokens}) must be below the model's context length ({ctx} tokens)."
        )


# Bytes per sequence and vocabulary entry for one sampling step: the fp32 logits, the processed scores, top-p's
# sorted values and int64 indices, their cumulative sum and the probabilities.
_STEP_BYTES_PER_VOCAB = 28
# Bytes the front ends keep per stored continuation beyond its characters (row dicts, scores, the string object).
_RESULT_OVERHEAD = 200


@dataclass(frozen=True)
class GenerationMemory:
    """An estimate of the memory generation needs: one batch of sequences on the model's device (the KV cache,
    the prompt's activations and one sampling step's vocabulary-sized tensors) and the results kept on the host."""

    sequences: int  # generated together in one batch: prompts per batch x samples
    batch_bytes: int
    result_bytes: int


def generation_memory(lm: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig) -> GenerationMemory:
    """Estimate what generating ``cfg.samples`` continuations of ``prompts`` needs (no forward pass)."""
    prompts = list(prompts)
    ctx = context_length(lm)
    room = None if ctx is None else max(1, ctx - cfg.max_new_tokens)
    batch = max(1, int(cfg.batch_size))
    per_prompt = max(int(cfg.samples), 1)
    n_seq = min(batch, max(len(prompts), 1)) * per_prompt
    prompt_len = max((len(_prompt_ids(lm, p, room)) for p in prompts), default=1)
    length = prompt_len + int(cfg.max_new_tokens)
    mc = lm.model.config
    elem = torch.finfo(lm.dtype).bits // 8 if lm.dtype.is_floating_point else 4
    heads = int(getattr(mc, "num_attention_heads", 0) or getattr(mc, "n_head", 0) or 1)
    kv_heads = int(getattr(mc, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(mc, "head_dim", 0) or lm.d_model // heads)
    vocab = int(getattr(mc, "vocab_size", 0) or len(lm.tokenizer))
    d_mlp = int(getattr(mc, "intermediate_size", 0) or getattr(mc, "n_inner", 0) or 4 * lm.d_model)
    per_seq = (
        2 * lm.n_layers * kv_heads * head_dim * length * elem  # the KV cache, at its final length
        + prompt_len * (d_mlp + 4 * lm.d_model) * elem  # one layer's activations over the prompt
        + heads * length * length * 4  # one layer's attention weights
        + vocab * _STEP_BYTES_PER_VOCAB  # one sampling step
        + length * 8 * 2  # token ids and the attention mask
    )
    n_texts = len(prompts) * (int(cfg.samples) + (1 if cfg.greedy or cfg.samples == 0 else 0))
    result = n_texts * (8 * int(cfg.max_new_tokens) + _RESULT_OVERHEAD)
    return GenerationMemory(sequences=n_seq, batch_bytes=n_seq * per_seq, result_bytes=result)


def available_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(bytes free on ``device``, bytes available to this process on the host); None where it cannot be told.

    The host figure is the smallest of MemAvailable (/proc/meminfo, else os.sysconf) and what the process's cgroup
    still allows (memory.max - memory.current, cgroup v2)."""
    from pathlib import Path

    host: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not host:
        try:
            host.append(int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
        except (AttributeError, OSError, ValueError):
            pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            host.append(max(0, int(limit) - int((cgroup / "memory.current").read_text().strip())))
    except (OSError, ValueError):
        pass
    free: int | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no answer: no limit imposed
            free = None
    elif device.type == "cpu":
        free = min(host) if host else None
    return free, (min(host) if host else None)


def check_generation(lm: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig) -> GenerationMemory:
    """Refuse, in one sentence and before any run is created, generation settings that are invalid or whose
    estimated memory (generation_memory) exceeds what is available on the device and the host."""
    from detox_tui.backends.stats import format_bytes

    _check_config(cfg, context_length(lm))
    need = generation_memory(lm, prompts, cfg)
    device_free, host_free = available_memory(lm.device)
    on_host = need.result_bytes + (need.batch_bytes if lm.device.type == "cpu" else 0)
    per_batch = max(1, min(int(cfg.batch_size), len(list(prompts)) or 1))
    shape = (
        f"{cfg.samples} samples for each of {per_batch} prompts at a time"
        if cfg.samples > 0
        else f"{per_batch} prompts at a time"
    )
    fix = "use fewer --samples, a smaller --batch-size or fewer --max-new-tokens"
    if lm.device.type != "cpu" and device_free is not None and need.batch_bytes > device_free:
        raise UserError(
            f"Generating {shape} needs about {format_bytes(need.batch_bytes)} on {lm.device}, but only "
            f"{format_bytes(device_free)} is free; {fix}."
        )
    if host_free is not None and on_host > host_free:
        raise UserError(
            f"Generating {shape} ({len(list(prompts))} prompts in all) needs about {format_bytes(on_host)} of "
            f"memory, but only {format_bytes(host_free)} is available; {fix}."
        )
    return need


def _generation_config(lm: LoadedModel, cfg: GenerationConfig, *, sample: bool, n_return: int):
    """A private copy of the model's generation config: the model's own defaults never leak into our settings."""
    gc = copy.deepcopy(lm.model.generation_config)
    gc.max_new_tokens = cfg.max_new_tokens
    gc.max_length = None
    gc.min_new_tokens = None
    gc.min_length = 0
    gc.num_beams = 1
    gc.num_return_sequences = n_return
    gc.pad_token_id = lm.pad_id
    gc.repetition_penalty = 1.0
    gc.no_repeat_ngram_size = 0
    if sample:
        gc.do_sample = True
        gc.temperature = float(cfg.temperature)
        gc.top_k = int(cfg.top_k)  # 0 disables top-k filtering
        gc.top_p = float(cfg.top_p)
    else:
        gc.do_sample = False
        gc.temperature = None
        gc.top_k = None
        gc.top_p = None
    return gc


class _CancelEachToken(StoppingCriteria):
    """Never stops a sequence; checks the cancel flag at every generated token, so a cancel (or the front end's
    checkpoint) does not wait for a whole batch of long generations."""

    def __init__(self, cancel: threading.Event | None):
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        check_cancel(self.cancel)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _decode_new(lm: LoadedModel, out: torch.Tensor, prompt_width: int) -> list[str]:
    new = out[:, prompt_width:].cpu()
    return lm.tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate_continuations(
    lm: LoadedModel,
    prompts: Sequence[str],
    cfg: GenerationConfig,
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    stage: str = "generate",
) -> list[PromptGenerations]:
    """Sample ``cfg.samples`` continuations per prompt (plus a greedy one if ``cfg.greedy`` or samples == 0).

    Continuations exclude the prompt (and its chat template, when the run wraps prompts in one). Prompts are
    processed ``cfg.batch_size`` at a time, left-padded with an attention mask; each batch seeds the RNG from
    (cfg.seed, batch index) inside a forked RNG state, so a seed gives the same table whatever ran before, and an
    edited model sees the same random stream layout.
    """
    prompts = list(prompts)
    ctx = context_length(lm)
    _check_config(cfg, ctx)
    want_greedy = cfg.greedy or cfg.samples == 0
    room = None if ctx is None else ctx - cfg.max_new_tokens
    pad_id = lm.pad_id
    batch_size = max(1, int(cfg.batch_size))
    sample_cfg = _generation_config(lm, cfg, sample=True, n_return=cfg.samples) if cfg.samples > 0 else None
    greedy_cfg = _generation_config(lm, cfg, sample=False, n_return=1) if want_greedy else None
    rng_devices = [lm.device] if lm.device.type == "cuda" else []
    stop = StoppingCriteriaList([_CancelEachToken(cancel)]) if cancel is not None else None
    results: list[PromptGenerations] = []
    total = len(prompts)
    emit(Progress(stage, 0, total))
    for b, start in enumerate(range(0, total, batch_size)):
        check_cancel(cancel)
        part = prompts[start : start + batch_size]
        ids, mask = pad_batch([_prompt_ids(lm, p, room) for p in part], pad_id, lm.device, side="left")
        samples: list[list[str]] = [[] for _ in part]
        if sample_cfg is not None:
            with torch.random.fork_rng(devices=rng_devices, device_type=lm.device.type):
                torch.manual_seed(batch_seed(cfg.seed, b))
                out = lm.model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=sample_cfg, stopping_criteria=stop
                )
            texts = _decode_new(lm, out, ids.shape[1])
            k = cfg.samples
            samples = [texts[i * k : (i + 1) * k] for i in range(len(part))]
        greedy: list[str | None] = [None] * len(part)
        if greedy_cfg is not None:
            out = lm.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=greedy_cfg, stopping_criteria=stop
            )
            greedy = list(_decode_new(lm, out, ids.shape[1]))
        for p, s, g in zip(part, samples, greedy):
            results.append(PromptGenerations(prompt=p, samples=list(s), greedy=g))
        emit(Progress(stage, len(results), total))
    return results


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, computed in float32 whatever the model's dtype."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def continuation_logprob(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean log-probability of each continuation's tokens given its prompt (teacher-forced), float32 on CPU.

    Prompt and continuation are tokenised separately (the continuation without special tokens), so the scored
    tokens are exactly the continuation's; with a chat template the continuation follows the wrapped prompt, as
    a generated one does. An empty continuation gives NaN.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    ctx = context_length(lm)
    pad_id = lm.pad_id
    pairs: list[tuple[list[int], int]] = []  # (full ids, number of continuation tokens)
    for prompt, cont in zip(prompts, continuations):
        c_ids = _encode(lm, cont, special=False)
        if ctx is not None:
            c_ids = c_ids[: ctx - 1]
        p_ids = _prompt_ids(lm, prompt, None if ctx is None else ctx - len(c_ids))
        pairs.append((p_ids + c_ids, len(c_ids)))
    out = torch.full((len(pairs),), float("nan"), dtype=torch.float32)
    for start in range(0, len(pairs), max(1, batch_size)):
        chunk = pairs[start : start + batch_size]
        ids, mask = pad_batch([full for full, _ in chunk], pad_id, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        for j, (full, n_cont) in enumerate(chunk):
            if n_cont == 0:
                continue
            end = len(full)
            first = end - n_cont
            lp = token_logprobs(logits[j, first - 1 : end - 1], ids[j, first:end])
            out[start + j] = lp.mean().cpu()
    return out
