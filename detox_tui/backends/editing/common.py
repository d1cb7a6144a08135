"""Shared MEMIT/ROME machinery: context templates, key positions, template-averaged keys, z/v optimisation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from detox_tui.backends.chat import prompt_ids, prompt_prefix_ids
from detox_tui.backends.editing.base import EditRequest
from detox_tui.backends.models import pad_batch, unembed_logits
from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Progress, check_cancel, null_callback

log = logging.getLogger(__name__)

EARLY_STOP_LOSS = 0.05
TEMPLATE_SEEDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


class _StopForward(Exception):
    """Raised from a hook once everything needed from this forward pass has been captured."""


def edit_cache(lm: Any) -> dict[str, Any]:
    """A per-model cache dict stored on the LoadedModel itself (never a module-level global)."""
    return lm.__dict__.setdefault("_edit_cache", {})


def _ids(lm: Any, text: str, special: bool = True) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=special)["input_ids"])


def _fill(template: str, text: str) -> str:
    return template.replace("{}", text, 1)


def context_templates(
    lm: Any,
    n: int = 5,
    length: int = 10,
    seeds: Sequence[str] = TEMPLATE_SEEDS,
    cache: dict | None = None,
) -> list[str]:
    """ "{}" plus ``n`` prefixes sampled once from the model (top-k 5, ``length`` tokens), each + ". {}".

    Sampling uses a fixed seed inside a forked RNG (reproducible, no effect on the caller's RNG) and the
    result is cached on the model object, so every edit of one model uses the same templates.
    """
    cache = edit_cache(lm) if cache is None else cache
    key = f"context_templates:{n}:{length}:{'|'.join(seeds)}"
    if key in cache:
        return list(cache[key])
    templates = ["{}"]
    devices = [lm.device.index or 0] if lm.device.type == "cuda" else []
    pad_id = lm.pad_id
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        for i in range(n):
            seed_text = seeds[i % len(seeds)]
            ids = torch.tensor([_ids(lm, seed_text)], device=lm.device)
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=5,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad_id,
            )
            text = lm.tokenizer.decode(out[0], skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(f"{text}. {{}}")
    cache[key] = list(templates)
    log.info("context templates: %s", templates)
    return templates


def template_groups(templates: Sequence[str]) -> list[list[int]]:
    """Indices of the template groups keys are averaged within: the bare "{}" and the sampled prefixes."""
    bare = [i for i, t in enumerate(templates) if t == "{}"]
    rest = [i for i, t in enumerate(templates) if t != "{}"]
    return [g for g in (bare, rest) if g]


def key_span_end(request: EditRequest) -> int:
    """Character offset in the prompt where the key span ends (subject's end, or the whole prompt)."""
    if request.subject:
        return request.prompt.index(request.subject) + len(request.subject)
    return len(request.prompt)


def key_position(lm: Any, template: str, request: EditRequest) -> tuple[list[int], int]:
    """Token ids of the templated prompt and the key token's index in them.

    The key is the last token of the subject (or of the prompt): we tokenise the templated text up to
    the span's end with the real tokenizer and take its length. With a chat template the templated text is
    the user turn, and a key at the prompt's end is the wrapped prompt's last token (the generation prompt's,
    where the model reads before it answers). Indices are within the unpadded row; batches here are
    right-padded, so they hold whatever the tokenizer's padding side.
    """
    text = _fill(template, request.prompt)
    full = prompt_ids(lm, text)
    end = key_span_end(request)
    if end == len(request.prompt):
        key = len(full) - 1
    else:
        prefix = prompt_prefix_ids(lm, text, template.index("{}") + end)
        key = min(len(prefix), len(full)) - 1
    if key < 0:
        raise UserError(f"The prompt '{request.prompt}' tokenises to nothing; it cannot be edited.")
    return full, key


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _run_until(lm: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
    try:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass


@torch.no_grad()
def template_keys(
    lm: Any, layer: int, requests: Sequence[EditRequest], templates: Sequence[str]
) -> torch.Tensor:
    """Out-projection inputs at the key token of every templated prompt: float64 [n_requests, n_templates, d_mlp].

    One forward pass, on the model as it is now; callers choose how to average over the templates.
    """
    rows, keys = [], []
    for req in requests:
        for template in templates:
            ids, key = key_position(lm, template, req)
            rows.append(ids)
            keys.append(key)
    ids, mask = pad_batch(rows, lm.pad_id, lm.device)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs):
        captured["k"] = inputs[0][
            torch.arange(len(rows), device=lm.device), torch.tensor(keys, device=lm.device)
        ]
        raise _StopForward

    handle = lm.module(lm.spec.mlp_out_path(layer)).register_forward_pre_hook(hook)
    try:
        _run_until(lm, ids, mask)
    finally:
        handle.remove()
    return captured["k"].to("cpu", torch.float64).view(len(requests), len(templates), -1)


def compute_keys(
    lm: Any, layer: int, requests: Sequence[EditRequest], templates: Sequence[str]
) -> torch.Tensor:
    """Out-projection inputs at the key token, averaged over templates: float64 [n_requests, d_mlp] on CPU.

    MEMIT's averaging (kmeng01/memit compute_ks): within each template group (bare prompt; sampled
    prefixes), then across groups. ROME averages flat over all templates instead (see rome.py).
    Computed on the model as it is now (MEMIT calls it on the partly edited model).
    """
    k = template_keys(lm, layer, requests, templates)
    groups = template_groups(templates)
    return torch.stack([k[:, g].mean(dim=1) for g in groups], dim=0).mean(dim=0)


@torch.no_grad()
def module_output_at_key(lm: Any, path: str, requests: Sequence[EditRequest]) -> torch.Tensor:
    """The output of module ``path`` at each bare prompt's key token: float64 [n_requests, d] on CPU."""
    rows, keys = zip(*(key_position(lm, "{}", req) for req in requests))
    ids, mask = pad_batch(rows, lm.pad_id, lm.device)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["h"] = _first(output)[
            torch.arange(len(rows), device=lm.device), torch.tensor(keys, device=lm.device)
        ]
        raise _StopForward

    handle = lm.module(path).register_forward_hook(hook)
    try:
        _run_until(lm, ids, mask)
    finally:
        handle.remove()
    return captured["h"].to("cpu", torch.float64)


@dataclass
class TargetResult:
    """Result of the z / v optimisation: ``init + delta`` is the value to install at the edit point."""

    # Both [n_requests, d_model] on the model's device, in compute_dtype(lm): float64 for a float64
    # model, else float32. ``init`` is the edit point's output at the bare prompt's key token.
    delta: torch.Tensor
    init: torch.Tensor
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    key_rows: torch.Tensor  # row index for each key
    key_pos: torch.Tensor
    key_req: torch.Tensor  # request index (within the batch) for each row
    tgt_rows: torch.Tensor  # one entry per (row, target token)
    tgt_pos: torch.Tensor
    tgt_ids: torch.Tensor
    tgt_row_of: torch.Tensor  # which NLL row each target token belongs to
    nll_rows: torch.Tensor  # row indices of the templated rows
    nll_req: torch.Tensor  # request index of each templated row
    kl_rows: torch.Tensor  # one KL row per request, in request order
    kl_read: torch.Tensor  # where each KL row's distribution is read
    init_rows: torch.Tensor  # the bare-template row of each request, in request order


def _build_batch(lm: Any, requests: Sequence[EditRequest], templates: Sequence[str]) -> _Batch:
    rows: list[list[int]] = []
    key_pos, key_req = [], []
    tgt_rows, tgt_pos, tgt_ids, tgt_row_of = [], [], [], []
    nll_rows, nll_req, kl_rows, kl_read, init_rows = [], [], [], [], []
    for r, req in enumerate(requests):
        text = req.toxic if req.mode == "erase" else req.target
        target = _ids(lm, text or "", special=False)
        if not target:
            raise UserError(f"The continuation for the prompt '{req.prompt}' tokenises to nothing.")
        for template in templates:
            ctx, key = key_position(lm, template, req)
            row = len(rows)
            if template == "{}" and len(init_rows) == r:
                init_rows.append(row)
            rows.append(ctx + target[:-1])
            key_pos.append(key)
            key_req.append(r)
            nll_rows.append(row)
            nll_req.append(r)
            for j, tok in enumerate(target):
                tgt_rows.append(row)
                tgt_pos.append(len(ctx) - 1 + j)
                tgt_ids.append(tok)
                tgt_row_of.append(len(nll_rows) - 1)
        if len(init_rows) == r:  # no bare template given: measure the norm on the first one
            init_rows.append(nll_rows[r * len(templates)])
        # KL anchor "{subject} is a" (the reference's kl_prompts) keeps what the model says about the subject
        # itself close to the original: the subject alone, or the whole prompt when there is no subject.
        subject = req.subject or req.prompt
        kl_ids = _ids(lm, f"{subject} is a")
        kl_key = min(len(_ids(lm, subject)), len(kl_ids)) - 1
        kl_rows.append(len(rows))
        # The reference reads the KL at the subject's last token, which predicts " is", not the target. When the
        # key is the prompt's last token (no subject, or one that ends the prompt) that same position predicts the
        # target itself, and a KL there would cancel the edit; read it at the anchor's last token (" a") instead.
        ends_prompt = key_span_end(req) == len(req.prompt)
        kl_read.append(len(kl_ids) - 1 if ends_prompt else kl_key)
        rows.append(kl_ids)
        key_pos.append(kl_key)
        key_req.append(r)
    ids, mask = pad_batch(rows, lm.pad_id, lm.device)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=lm.device)

    return _Batch(
        ids=ids,
        mask=mask,
        key_rows=t(list(range(len(rows)))),
        key_pos=t(key_pos),
        key_req=t(key_req),
        tgt_rows=t(tgt_rows),
        tgt_pos=t(tgt_pos),
        tgt_ids=t(tgt_ids),
        tgt_row_of=t(tgt_row_of),
        nll_rows=t(nll_rows),
        nll_req=t(nll_req),
        kl_rows=t(kl_rows),
        kl_read=t(kl_read),
        init_rows=t(init_rows),
    )


def path_layer(lm: Any, path: str) -> int | None:
    """The block index a module path lies in (a block, or a module inside one), or None."""
    for layer in range(lm.n_layers):
        block = lm.spec.block_path(layer)
        if path == block or path.startswith(block + "."):
            return layer
    return None


def _loss_point(lm: Any, v_loss_layer: int, edit_layer: int | None) -> tuple[str, bool]:
    """Where the loss reads hidden states: the final norm's output, or block ``v_loss_layer``'s output.

    A loss layer below the edited one would read states the edit cannot reach; like the reference
    (kmeng01/rome and memit compute_v/compute_z: ``loss_layer = max(v_loss_layer, layer)``) it is
    raised to the edited layer.
    """
    if edit_layer is not None:
        v_loss_layer = max(v_loss_layer, edit_layer)
    if v_loss_layer >= lm.n_layers - 1:
        return lm.spec.final_norm, False
    return lm.spec.block_path(v_loss_layer), True


def compute_dtype(lm: Any) -> torch.dtype:
    """The dtype of the edit math: the model's own when it is float64, else float32 (never fp16/bf16)."""
    return torch.float64 if lm.dtype == torch.float64 else torch.float32


def _group_mean(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, groups, torch.ones_like(values)
    )
    return sums / counts


def _optimise(
    lm: Any,
    requests: Sequence[EditRequest],
    edit_path: str,
    templates: Sequence[str],
    hp: dict[str, Any],
    on_step,
    cancel: threading.Event | None,
) -> TargetResult:
    n = len(requests)
    batch = _build_batch(lm, requests, templates)
    loss_path, needs_norm = _loss_point(lm, int(hp["v_loss_layer"]), path_layer(lm, edit_path))
    final_norm = lm.module(lm.spec.final_norm)
    dtype = compute_dtype(lm)
    delta = torch.zeros((n, lm.d_model), dtype=dtype, device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=float(hp["v_lr"]))
    state: dict[str, torch.Tensor] = {}

    def edit_hook(_module, _inputs, output):
        hidden = _first(output)
        if "init" not in state:
            at_init = hidden[batch.init_rows, batch.key_pos[batch.init_rows]]
            state["init"] = at_init.detach().to(dtype)
        add = torch.zeros_like(hidden)
        add = add.index_put((batch.key_rows, batch.key_pos), delta[batch.key_req].to(hidden.dtype))
        return _replace_first(output, hidden + add)

    def loss_hook(_module, _inputs, output):
        state["hidden"] = _first(output)
        raise _StopForward

    handles = [
        lm.module(edit_path).register_forward_hook(edit_hook),
        lm.module(loss_path).register_forward_hook(loss_hook),
    ]
    steps_total = int(hp["v_num_grad_steps"])
    active = torch.ones(n, dtype=torch.bool, device=lm.device)
    losses = torch.zeros(n, dtype=torch.float64)
    steps_done = torch.zeros(n, dtype=torch.long)
    kl_init: torch.Tensor | None = None
    erase = torch.tensor([req.mode == "erase" for req in requests], device=lm.device)
    try:
        for it in range(steps_total):
            check_cancel(cancel)
            _run_until(lm, batch.ids, batch.mask)
            hidden = state.pop("hidden")
            if needs_norm:
                hidden = final_norm(hidden)
            tgt_logp = unembed_logits(lm, hidden[batch.tgt_rows, batch.tgt_pos]).to(dtype).log_softmax(-1)
            tok_logp = tgt_logp.gather(1, batch.tgt_ids[:, None])[:, 0]
            # replace: NLL of the safe target; erase: unlikelihood -log(1 - p) of the toxic tokens.
            unlikely = -torch.log((-torch.expm1(tok_logp)).clamp_min(1e-12))
            per_tok = torch.where(erase[batch.nll_req[batch.tgt_row_of]], unlikely, -tok_logp)
            per_row = _group_mean(per_tok, batch.tgt_row_of, len(batch.nll_rows))
            task = _group_mean(per_row, batch.nll_req, n)
            kl_logp = unembed_logits(lm, hidden[batch.kl_rows, batch.kl_read]).to(dtype).log_softmax(-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            init = state["init"]
            decay = delta.norm(dim=-1) / init.norm(dim=-1) ** 2
            loss = task + float(hp["kl_factor"]) * kl + float(hp["v_weight_decay"]) * decay
            detached = loss.detach()
            losses[active.cpu()] = detached[active].cpu().double()
            active = active & (detached >= EARLY_STOP_LOSS)
            on_step(it + 1, steps_total)
            if it == steps_total - 1 or not bool(active.any()):
                break
            opt.zero_grad(set_to_none=False)
            loss[active].sum().backward()
            frozen = delta.detach()[~active].clone()
            opt.step()
            with torch.no_grad():
                # Rows that met the early-stop criterion are frozen: Adam's momentum must not move them.
                delta[~active] = frozen
                max_norm = float(hp["clamp_norm_factor"]) * init.norm(dim=-1)
                norms = delta.norm(dim=-1)
                scale = torch.where(
                    norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms)
                )
                delta.mul_(torch.where(active, scale, torch.ones_like(scale))[:, None])
            steps_done[active.cpu()] += 1
    finally:
        for h in handles:
            h.remove()
    return TargetResult(
        delta=delta.detach().clone(),
        init=state["init"].clone(),
        losses=[float(x) for x in losses],
        steps=[int(x) for x in steps_done],
    )


def compute_targets(
    lm: Any,
    requests: Sequence[EditRequest],
    edit_path: str,
    templates: Sequence[str],
    hparams: dict[str, Any],
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    stage: str = "memit z",
) -> TargetResult:
    """Optimise one vector per request added to ``edit_path``'s output at the key token of every template.

    Loss per request = mean over templates of the target NLL (erase: the toxic tokens' unlikelihood
    -log(1 - p)) read through the final norm and unembedding at max(``v_loss_layer``, edited layer) +
    kl_factor x KL(p_now || p_orig) on "{subject} is a" (the whole prompt when there is no subject), read
    at the subject's last token (at " a" when the key is the prompt's last token) + v_weight_decay x
    ||delta|| / ||h||^2, in float32 (float64 for a float64 model).
    Adam (v_lr), at most v_num_grad_steps; a request stops (and is frozen) when its loss < 0.05; after
    each step ||delta_i|| is clamped to clamp_norm_factor x ||h_i||. With ``batch_z`` (default) every
    request is optimised in one [n, d_model] parameter; the result equals the one-at-a-time result,
    because the requests' losses are independent and Adam works elementwise.
    """
    if not requests:
        raise UserError("There are no edit requests.")
    total = int(hparams["v_num_grad_steps"])
    if bool(hparams.get("batch_z", True)):
        result = _optimise(
            lm, requests, edit_path, templates, hparams, lambda s, t: emit(Progress(stage, s, t)), cancel
        )
        return result
    parts: list[TargetResult] = []
    for i, req in enumerate(requests):

        def on_step(s: int, t: int, i: int = i) -> None:
            emit(Progress(stage, i * total + s, len(requests) * total, f"request {i + 1}/{len(requests)}"))

        parts.append(_optimise(lm, [req], edit_path, templates, hparams, on_step, cancel))
    return TargetResult(
        delta=torch.cat([p.delta for p in parts]),
        init=torch.cat([p.init for p in parts]),
        losses=[x for p in parts for x in p.losses],
        steps=[x for p in parts for x in p.steps],
    )


def template_hparams(hparams: dict[str, Any]) -> tuple[int, int]:
    """(number of sampled context templates, their length in tokens) from the hparams or the reference."""
    return int(hparams.get("n_templates", 5)), int(hparams.get("template_length", 10))


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for a symmetric PSD ``a`` (float64), with a tiny ridge if it is singular."""
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:  # torch raises _LinAlgError (a RuntimeError) on a singular matrix
        ridge = 1e-8 * float(a.diagonal().mean().abs()) + 1e-12
        log.warning("singular statistics matrix; adding a ridge of %.3g", ridge)
        return torch.linalg.solve(a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), b)
