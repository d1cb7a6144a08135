"""Faithfulness to the papers and reference code, each checked against a direct re-implementation here.

- ROME's two key forms (kmeng01/rome's rank-one update; r-ROME, Gupta et al. 2024) against their formulas.
- The z/v optimisation's KL anchor is "{subject} is a", read at the subject's last token.
- A v_loss_layer below the edited layer is raised to it (reference: max(v_loss_layer, layer)).
- The z/v loss follows a float64 model's dtype.
"""

from __future__ import annotations

import pytest
import torch

import detox_tui.backends.editing.rome as rome_module
from detox_tui.backends.editing.base import EditContext, EditRequest
from detox_tui.backends.editing.common import TargetResult, _build_batch, compute_targets
from detox_tui.backends.editing.presets import CHOICES, family_presets, validate_hparams
from detox_tui.backends.editing.rome import RomeEditor
from detox_tui.errors import UserError

PROMPT = "People from that town are all"
SUBJECT = "that town"  # mid-prompt: the key is " town", not the prompt's last token
TEMPLATES = ["{}", "Yesterday I went to the park. {}"]
LAYER = 1
C_PROJ = f"transformer.h.{LAYER}.mlp.c_proj"  # the tiny models are GPT-2: Conv1D stores (in, out)


def ids_of(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text)["input_ids"])


def subject_last_index(lm, template: str, prompt: str, subject: str) -> int:
    """Index of the subject's last token in the templated prompt (tokenise the text up to its end)."""
    end = prompt.index(subject) + len(subject)
    return len(ids_of(lm, template.replace("{}", prompt[:end]))) - 1


def c_proj_input(lm, text: str, position: int) -> torch.Tensor:
    """The out-projection's input (the ROME key) at ``position`` of ``text``, float64."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, inputs):
        seen["k"] = inputs[0][0, position].detach().double()

    handle = lm.model.get_submodule(C_PROJ).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids_of(lm, text)]))
    finally:
        handle.remove()
    return seen["k"]


def c_proj_output(lm, text: str, position: int) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        seen["v"] = output[0, position].detach().double()

    handle = lm.model.get_submodule(C_PROJ).register_forward_hook(hook)
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids_of(lm, text)]))
    finally:
        handle.remove()
    return seen["v"]


def rome_expected(w, b, cov, k_avg, k_res, v_star) -> torch.Tensor:
    """Delta W = (v* - W k - b) (C^-1 k_avg)^T / ((C^-1 k_avg)^T k), written out (out, in layout)."""
    u = torch.linalg.solve(cov, k_avg)
    u = u / u.norm()  # the reference's left vector; the scale cancels
    right = (v_star - (w @ k_res + b)) / torch.dot(k_res, u)
    return torch.outer(right, u)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))


@pytest.mark.parametrize("form", ["reference", "consistent"])
def test_rome_key_form_is_its_papers_rank_one_update(tiny_lm, monkeypatch, form):
    lm = tiny_lm
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(lm.d_mlp, lm.d_mlp, generator=gen, dtype=torch.float64)
    cov = a @ a.T / lm.d_mlp + 0.05 * torch.eye(lm.d_mlp, dtype=torch.float64)
    # v* is fixed by the test (the v optimisation has its own tests below), float32-representable: the
    # layer's current output at the key plus a small change, as a real v* is; then the two forms differ.
    now = c_proj_output(lm, PROMPT, subject_last_index(lm, "{}", PROMPT, SUBJECT))
    v_star = (
        (now + 0.1 * now.norm() / lm.d_model**0.5 * torch.randn(lm.d_model, generator=gen)).float().double()
    )

    def fixed_targets(lm_, requests, edit_path, templates, hparams, **_kw):
        assert edit_path == f"transformer.h.{LAYER}.mlp" and len(requests) == 1
        return TargetResult(
            delta=torch.zeros(1, lm.d_model), init=v_star.float()[None], losses=[0.0], steps=[0]
        )

    monkeypatch.setattr(rome_module, "compute_targets", fixed_targets)
    request = EditRequest(PROMPT, " kind", subject=SUBJECT)
    ctx = EditContext(covariance=lambda lm_, layers: {LAYER: cov})
    delta = RomeEditor().compute(lm, [request], {"layer": LAYER, "n_templates": 2, "key_form": form}, ctx)
    assert delta.hparams["key_form"] == form and delta.info["key_form"] == form

    templates = delta.info["templates"]
    assert templates[0] == "{}" and len(templates) == 3
    keys = torch.stack(
        [
            c_proj_input(lm, t.replace("{}", PROMPT), subject_last_index(lm, t, PROMPT, SUBJECT))
            for t in templates
        ]
    )
    k_bare, k_avg = keys[0], keys.mean(dim=0)  # kmeng01/rome compute_u: a flat mean over all templates
    module = lm.model.get_submodule(C_PROJ)
    w, b = module.weight.detach().double().T, module.bias.detach().double()

    k_res = k_bare if form == "reference" else k_avg
    k_other = k_avg if form == "reference" else k_bare
    expected = rome_expected(w, b, cov, k_avg, k_res, v_star)
    got = delta.deltas[f"{C_PROJ}.weight"].double().T
    assert cosine(got, expected) > 1 - 1e-9
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # The forms really differ on this request: the other formula is not what we returned.
    assert cosine(got, rome_expected(w, b, cov, k_avg, k_other, v_star)) < 0.999

    # The edited layer maps its form's key to v* (the reference: the bare prompt's; r-ROME: the average).
    assert torch.allclose((w + got) @ k_res + b, v_star, atol=1e-4)
    assert float(((w + got) @ k_other + b - v_star).norm()) > 1e-2
    if form == "reference":  # the bare key is a real forward pass: check it in the edited model itself
        position = subject_last_index(lm, "{}", PROMPT, SUBJECT)
        with delta.applied_to(lm.model):
            assert torch.allclose(c_proj_output(lm, PROMPT, position), v_star, atol=1e-4)


def test_rome_requests_are_applied_one_after_another(tiny_lm, monkeypatch):
    """Like kmeng01/rome's apply_rome_to_model: each request's update is computed on the edited model."""
    lm = tiny_lm
    gen = torch.Generator().manual_seed(1)
    cov = torch.eye(lm.d_mlp, dtype=torch.float64) + 0.01 * torch.ones(
        lm.d_mlp, lm.d_mlp, dtype=torch.float64
    )
    prompts = [(PROMPT, SUBJECT), ("My new coworker is such a", "coworker")]
    v_stars = [torch.randn(lm.d_model, generator=gen).double() * 0.1 for _ in prompts]
    calls = iter(v_stars)

    def fixed_targets(lm_, requests, edit_path, templates, hparams, **_kw):
        v = next(calls)
        return TargetResult(delta=torch.zeros(1, lm.d_model), init=v.float()[None], losses=[0.0], steps=[0])

    monkeypatch.setattr(rome_module, "compute_targets", fixed_targets)
    requests = [EditRequest(p, " kind", subject=s) for p, s in prompts]
    ctx = EditContext(covariance=lambda lm_, layers: {LAYER: cov})
    hp = {"layer": LAYER, "n_templates": 2, "key_form": "consistent"}
    delta = RomeEditor().compute(lm, requests, hp, ctx)

    templates = delta.info["templates"]
    module = lm.model.get_submodule(C_PROJ)
    w, b = module.weight.detach().double().T.clone(), module.bias.detach().double()
    total = torch.zeros_like(w)
    for (prompt, subject), v_star in zip(prompts, v_stars):
        keys = torch.stack(
            [
                c_proj_input(lm, t.replace("{}", prompt), subject_last_index(lm, t, prompt, subject))
                for t in templates
            ]
        )  # the layer's own keys do not depend on its out-projection
        k_avg = keys.mean(dim=0)
        total += rome_expected(w + total, b, cov, k_avg, k_avg, v_star.float().double())
    got = delta.deltas[f"{C_PROJ}.weight"].double().T
    assert torch.allclose(got, total, rtol=1e-4, atol=1e-5 * float(total.abs().max()))


def test_rome_key_form_is_in_every_preset_and_validated(tiny_lm):
    assert set(CHOICES["key_form"]) == {"reference", "consistent"}
    for family in ("gpt2", "gpt_neox", "gptj", "llama"):
        assert family_presets(family)["defaults"]["rome"]["key_form"] == "consistent"
    assert validate_hparams(tiny_lm, "rome", {"key_form": "reference"})["key_form"] == "reference"
    assert validate_hparams(tiny_lm, "rome", {})["key_form"] == "consistent"
    with pytest.raises(UserError) as info:
        validate_hparams(tiny_lm, "rome", {"key_form": "bare"})
    message = str(info.value)
    assert (
        "\n" not in message and "key_form" in message and "consistent" in message and "reference" in message
    )
    with pytest.raises(UserError, match="key_form"):
        validate_hparams(tiny_lm, "rome", {"key_form": 1})


def _row_text(lm, batch, row: int) -> str:
    ids = batch.ids[row][batch.mask[row].bool()].tolist()
    return lm.tokenizer.decode(ids)


@pytest.mark.parametrize(
    "prompt, subject, anchor, read_at_subject",
    [
        (PROMPT, SUBJECT, "that town is a", True),  # mid-prompt subject: its last token
        ("People from that town", SUBJECT, "that town is a", False),  # key = prompt's last token: " a"
        (PROMPT, None, PROMPT + " is a", False),  # no subject: the whole prompt is the anchor's subject
    ],
)
def test_kl_anchor_is_the_subject_is_a(tiny_lm, prompt, subject, anchor, read_at_subject):
    lm = tiny_lm
    batch = _build_batch(lm, [EditRequest(prompt, " kind", subject=subject)], TEMPLATES)
    row = int(batch.kl_rows[0])
    assert _row_text(lm, batch, row) == anchor
    anchor_ids = ids_of(lm, anchor)
    subject_end = len(ids_of(lm, subject or prompt)) - 1
    # The delta goes in at the anchor's subject's last token, as in every templated prompt.
    assert int(batch.key_pos[row]) == subject_end
    expected_read = subject_end if read_at_subject else len(anchor_ids) - 1
    assert int(batch.kl_read[0]) == expected_read


def reference_z_loss(lm, request, templates, edit_path, delta, hp) -> tuple[float, float]:
    """The z/v loss at ``delta`` written out from the paper, in float64, one prompt at a time.

    mean over templates of the target tokens' mean NLL + kl_factor x KL(p_delta || p_0) on "{subject} is
    a" at the subject's last token + v_weight_decay x ||delta|| / ||h_0||^2 (v_loss_layer = last layer).
    """
    module = lm.model.get_submodule(edit_path)
    target = list(lm.tokenizer(request.target, add_special_tokens=False)["input_ids"])

    def logp(ids: list[int], position: int, add: torch.Tensor | None) -> torch.Tensor:
        def hook(_m, _i, output):
            if add is None:
                return output
            output = output.clone()
            output[0, position] += add.to(output.dtype)
            return output

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return lm.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        finally:
            handle.remove()

    nlls = []
    for template in templates:
        ctx = ids_of(lm, template.replace("{}", request.prompt))
        key = subject_last_index(lm, template, request.prompt, request.subject)
        lp = logp(ctx + target[:-1], key, delta)
        nlls.append(-torch.stack([lp[len(ctx) - 1 + j, t] for j, t in enumerate(target)]).mean())
    anchor = ids_of(lm, f"{request.subject} is a")
    at = len(ids_of(lm, request.subject)) - 1
    p0, p1 = logp(anchor, at, None)[at], logp(anchor, at, delta)[at]
    kl = (p1.exp() * (p1 - p0)).sum()
    seen = {}

    def record(_m, _i, output):
        seen["h"] = output[0].double()

    handle = module.register_forward_hook(record)
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids_of(lm, request.prompt)]))
    finally:
        handle.remove()
    h0 = seen["h"][subject_last_index(lm, "{}", request.prompt, request.subject)]
    decay = delta.double().norm() / h0.norm() ** 2
    nll = torch.stack(nlls).mean()
    return float(nll + hp["kl_factor"] * kl + hp["v_weight_decay"] * decay), float(kl)


Z_HP = {
    "v_loss_layer": 3,
    "v_lr": 0.5,
    "v_num_grad_steps": 6,
    "v_weight_decay": 0.5,
    "kl_factor": 1.0,
    "clamp_norm_factor": 4.0,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_loss_is_the_papers_loss_in_the_models_dtype(tiny_lm, dtype):
    lm = tiny_lm
    lm.model.to(dtype)
    request = EditRequest(PROMPT, " stupid", subject=SUBJECT)
    edit_path = f"transformer.h.{LAYER}.mlp"
    result = compute_targets(lm, [request], edit_path, TEMPLATES, Z_HP)
    assert result.delta.dtype == dtype and result.init.dtype == dtype
    assert result.steps[0] >= 1 and float(result.delta.norm()) > 0
    # The recorded loss is the loss at the returned delta (the last step's forward pass).
    expected, kl = reference_z_loss(lm, request, TEMPLATES, edit_path, result.delta[0], Z_HP)
    assert kl > 1e-3  # the KL term matters here, so the anchor it is read on is checked too
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    assert result.losses[0] == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("edit_path", ["transformer.h.2.mlp", "transformer.h.2"])
def test_v_loss_layer_below_the_edit_layer_reads_at_the_edit_layer(tiny_lm, edit_path):
    lm = tiny_lm
    request = EditRequest(PROMPT, " stupid", subject=SUBJECT)
    hp = {**Z_HP, "v_num_grad_steps": 3}
    below = compute_targets(lm, [request], edit_path, TEMPLATES, {**hp, "v_loss_layer": 0})
    at = compute_targets(lm, [request], edit_path, TEMPLATES, {**hp, "v_loss_layer": 2})
    assert float(at.delta.norm()) > 0
    assert torch.equal(below.delta, at.delta) and below.losses == at.losses
    # And through the editor, with validated hparams: no crash, the same edit.
    ctx = EditContext(covariance=lambda lm_, layers: {2: torch.eye(lm.d_mlp, dtype=torch.float64)})
    rome = {"layer": 2, "n_templates": 1, "v_num_grad_steps": 2}
    low = RomeEditor().compute(lm, [request], {**rome, "v_loss_layer": 0}, ctx)
    same = RomeEditor().compute(lm, [request], {**rome, "v_loss_layer": 2}, ctx)
    name = "transformer.h.2.mlp.c_proj.weight"
    assert torch.equal(low.deltas[name], same.deltas[name])


def test_memit_keys_average_within_the_bare_and_sampled_groups_then_across(tiny_lm):
    # kmeng01/memit compute_ks: the keys of each context-template group are averaged, then the groups' means are
    # averaged: [["{}"], [sampled prefixes...]] -> (k_bare + mean(k_prefixes)) / 2, not a flat mean over all six.
    from detox_tui.backends.editing.common import compute_keys, context_templates

    lm = tiny_lm
    templates = context_templates(lm, n=3, length=4)
    requests = [
        EditRequest("The people next door are", " kind", subject="people"),
        EditRequest("My coworker is", " nice"),
    ]
    got = compute_keys(lm, LAYER, requests, templates)
    for row, req in zip(got, requests):
        subject = req.subject or req.prompt
        keys = [
            c_proj_input(lm, t.replace("{}", req.prompt), subject_last_index(lm, t, req.prompt, subject))
            for t in templates
        ]
        bare = keys[templates.index("{}")]
        sampled = torch.stack([k for t, k in zip(templates, keys) if t != "{}"]).mean(0)
        expected = (bare + sampled) / 2
        assert torch.allclose(row, expected, atol=1e-5, rtol=1e-5)
        flat = torch.stack(keys).mean(0)
        assert not torch.allclose(row, flat, atol=1e-5, rtol=1e-5)  # the grouping matters: this test can tell
