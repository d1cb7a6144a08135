"""Generation: reproducible seeded samples, continuations only, greedy, batching invariance, log-probs."""

from __future__ import annotations

import threading

import pytest
import torch

from detox_tui.config import GenerationConfig
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Progress
from detox_tui.pipeline.generation import continuation_logprob, generate_continuations
from detox_tui.tiny import HELDOUT_PROMPTS, INSULT_PAIRS

PROMPTS = ["The weather today is", "She opened the door and", "A", "In the morning the old man walked to the"]


def _cfg(**kw) -> GenerationConfig:
    base = dict(samples=3, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=0, batch_size=2)
    base.update(kw)
    return GenerationConfig(**base)


def _table(gens):
    return [(g.prompt, g.samples, g.greedy) for g in gens]


def test_same_seed_gives_identical_table_even_after_another_seed_ran(tiny_lm):
    first = _table(generate_continuations(tiny_lm, PROMPTS, _cfg(seed=11)))
    again = _table(generate_continuations(tiny_lm, PROMPTS, _cfg(seed=11)))
    generate_continuations(tiny_lm, PROMPTS, _cfg(seed=12))
    torch.rand(100)  # unrelated use of the global RNG in between
    after_other = _table(generate_continuations(tiny_lm, PROMPTS, _cfg(seed=11)))
    assert first == again == after_other
    assert all(len(samples) == 3 for _, samples, _ in first)


def test_different_seeds_give_different_samples(tiny_lm):
    a = generate_continuations(tiny_lm, PROMPTS, _cfg(seed=1))
    b = generate_continuations(tiny_lm, PROMPTS, _cfg(seed=2))
    assert [g.samples for g in a] != [g.samples for g in b]
    # The samples of one prompt are not all copies of each other on an untrained (high-entropy) model.
    assert any(len(set(g.samples)) > 1 for g in a)


def test_global_rng_state_is_restored(tiny_lm):
    state = torch.random.get_rng_state()
    generate_continuations(tiny_lm, PROMPTS, _cfg(seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_batch_sees_the_same_random_stream_whatever_the_other_batches_hold(tiny_lm):
    # Seeds depend on (seed, batch index) only: the second batch samples identically when the first changes.
    cfg = _cfg(seed=3, batch_size=1)
    a = generate_continuations(tiny_lm, ["Hello there my", PROMPTS[1]], cfg)
    b = generate_continuations(tiny_lm, ["Completely different first prompt", PROMPTS[1]], cfg)
    assert a[1].samples == b[1].samples


def test_continuations_exclude_the_prompt(insult_lm):
    prompts = [p for p, _, _ in INSULT_PAIRS]
    gens = generate_continuations(insult_lm, prompts, _cfg(samples=2, greedy=True, max_new_tokens=5))
    for (prompt, insult, _), g in zip(INSULT_PAIRS, gens):
        assert g.prompt == prompt
        # The trained model continues with its insult: the continuation starts right after the prompt.
        first_word = insult.split()[0]
        assert g.greedy.split()[0] == first_word
        assert prompt not in g.greedy
        assert all(prompt not in s for s in g.samples)


def test_greedy_option_and_greedy_only(insult_lm):
    prompts = [p for p, _, _ in INSULT_PAIRS[:3]]
    with_greedy = generate_continuations(insult_lm, prompts, _cfg(samples=2, greedy=True, seed=1))
    only_greedy = generate_continuations(insult_lm, prompts, _cfg(samples=0, seed=99))
    no_greedy = generate_continuations(insult_lm, prompts, _cfg(samples=2, greedy=False))
    assert all(g.greedy is None and len(g.samples) == 2 for g in no_greedy)
    assert all(g.samples == [] and g.greedy for g in only_greedy)
    assert [g.greedy for g in with_greedy] == [g.greedy for g in only_greedy]  # the seed does not matter


def test_greedy_output_does_not_depend_on_batch_size(tiny_lm):
    prompts = PROMPTS + list(HELDOUT_PROMPTS) + ["x"]
    one = generate_continuations(tiny_lm, prompts, _cfg(samples=0, batch_size=1, max_new_tokens=8))
    eight = generate_continuations(tiny_lm, prompts, _cfg(samples=0, batch_size=8, max_new_tokens=8))
    assert [g.greedy for g in one] == [g.greedy for g in eight]


def test_max_new_tokens_cuts_the_greedy_continuation(insult_lm):
    prompts = [p for p, _, _ in INSULT_PAIRS]
    short = generate_continuations(insult_lm, prompts, _cfg(samples=0, max_new_tokens=2))
    long = generate_continuations(insult_lm, prompts, _cfg(samples=0, max_new_tokens=8))
    for s, g in zip(short, long):
        assert g.greedy.startswith(s.greedy) and len(s.greedy) < len(g.greedy)


def test_progress_per_batch_and_cancel(tiny_lm):
    events = []
    generate_continuations(tiny_lm, PROMPTS, _cfg(batch_size=3), emit=events.append, stage="generate before")
    progress = [(e.stage, e.done, e.total) for e in events if isinstance(e, Progress)]
    assert progress[-1] == ("generate before", 4, 4)
    assert ("generate before", 3, 4) in progress
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        generate_continuations(tiny_lm, PROMPTS, _cfg(), cancel=cancel)


def test_a_cancel_stops_generation_within_a_token_and_checking_changes_no_sample(tiny_lm):
    class CancelAfter(threading.Event):
        """Sets itself at its n-th check."""

        def __init__(self, n: int):
            super().__init__()
            self.n, self.checks = n, 0

        def is_set(self) -> bool:
            self.checks += 1
            if self.checks == self.n:
                self.set()
            return super().is_set()

    cfg = _cfg(max_new_tokens=40, batch_size=4, greedy=True)
    cancel = CancelAfter(
        3
    )  # the batch's check, then two generated tokens: one batch of 40 tokens never finishes
    with pytest.raises(Cancelled):
        generate_continuations(tiny_lm, PROMPTS, cfg, cancel=cancel)
    assert cancel.checks == 3
    never = CancelAfter(10**9)
    assert _table(generate_continuations(tiny_lm, PROMPTS, cfg, cancel=never)) == _table(
        generate_continuations(tiny_lm, PROMPTS, cfg)
    )
    assert never.checks > 40  # checked at every token of the sampled and the greedy pass


def test_bad_generation_settings_are_user_errors(tiny_lm):
    with pytest.raises(UserError, match="context length"):
        generate_continuations(tiny_lm, PROMPTS, _cfg(max_new_tokens=10_000))
    with pytest.raises(UserError, match="temperature"):
        generate_continuations(tiny_lm, PROMPTS, _cfg(temperature=0.0))


def test_continuation_logprob_prefers_the_trained_insult_and_is_batch_invariant(insult_lm):
    prompts = [p for p, _, _ in INSULT_PAIRS]
    insults = [t for _, t, _ in INSULT_PAIRS]
    targets = [s for _, _, s in INSULT_PAIRS]
    lp_insult = continuation_logprob(insult_lm, prompts, insults)
    lp_target = continuation_logprob(insult_lm, prompts, targets)
    assert lp_insult.shape == (len(prompts),) and lp_insult.dtype == torch.float32
    assert bool((lp_insult > lp_target).all())
    one_by_one = torch.cat([continuation_logprob(insult_lm, [p], [t]) for p, t in zip(prompts, targets)])
    assert torch.allclose(one_by_one, lp_target, atol=1e-4)


def test_continuation_logprob_matches_a_direct_forward_pass(insult_lm):
    prompt, cont = "The new neighbours upstairs are", " quiet and polite people."
    tok = insult_lm.tokenizer
    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(insult_lm.model(ids).logits[0].float(), -1)
    expected = torch.stack([logp[len(p_ids) + i - 1, t] for i, t in enumerate(c_ids)]).mean()
    got = continuation_logprob(insult_lm, [prompt, "Another prompt"], [cont, " ok"])[0]
    assert torch.isclose(got, expected, atol=1e-4)
