"""Covariance statistics: one pass equals one pass per layer, the cache is reused, damage is detected."""

from __future__ import annotations

import logging

import pytest
import torch

from detox_tui.backends.stats import _CHUNK_TOKENS, covariance, covariance_per_layer, default_stats_tokens
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Progress
from detox_tui.tiny import neutral_lines


def test_one_pass_equals_one_pass_per_layer(tiny_lm):
    texts = neutral_lines()
    one = covariance(tiny_lm, [3, 0, 2], texts=texts, tokens=400, batch_size=4)
    per = covariance_per_layer(tiny_lm, [0, 2, 3], texts=texts, tokens=400, batch_size=4)
    assert sorted(one) == [0, 2, 3]
    for layer in (0, 2, 3):
        c = one[layer]
        assert c.dtype == torch.float64 and c.device.type == "cpu"
        assert c.shape == (tiny_lm.d_mlp, tiny_lm.d_mlp)
        assert torch.allclose(c, c.T)
        assert torch.allclose(c, per[layer], rtol=1e-10, atol=1e-12)
    # Uncentred second moment: its diagonal is the mean squared activation, positive for a GELU MLP.
    assert bool((one[0].diagonal() > 0).all())


def test_float32_batch_products_match_a_float64_reference(tiny_lm):
    # Reference: every document forwarded alone (no padding), its keys multiplied out in float64.
    # The corpus spans several float32 chunks, so the float64 sum across chunks is exercised too.
    texts = [f"{i}: {line}" for i in range(6) for line in neutral_lines()]
    layer = 2
    keys: list[torch.Tensor] = []
    module = tiny_lm.module(tiny_lm.spec.mlp_out_path(layer))
    handle = module.register_forward_pre_hook(lambda _m, inputs: keys.append(inputs[0][0].double()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tiny_lm.tokenizer(text, add_special_tokens=True, truncation=True, max_length=256)[
                    "input_ids"
                ]
                tiny_lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    k = torch.cat(keys)
    assert k.shape[0] > 2 * _CHUNK_TOKENS
    reference = k.T @ k / k.shape[0]
    ours = covariance(tiny_lm, [layer], texts=texts, tokens=k.shape[0], batch_size=4)[layer]
    assert ours.dtype == torch.float64
    rel = float(torch.linalg.matrix_norm(ours - reference) / torch.linalg.matrix_norm(reference))
    assert rel < 1e-5, rel
    # The full-forward baseline (no early stop) sees the same keys.
    full = covariance_per_layer(
        tiny_lm, [layer], texts=texts, tokens=k.shape[0], batch_size=4, early_stop=False
    )
    assert torch.equal(full[layer], ours)


def test_token_budget_and_padding_do_not_change_the_result(tiny_lm):
    texts = neutral_lines()[:12]
    a = covariance(tiny_lm, [1], texts=texts, tokens=10_000, batch_size=1)[1]
    b = covariance(tiny_lm, [1], texts=texts, tokens=10_000, batch_size=5)[1]
    # float32 forwards of differently padded batches agree to rounding; pads would add whole tokens.
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # A smaller budget uses fewer tokens, so a different estimate.
    c = covariance(tiny_lm, [1], texts=texts, tokens=20, batch_size=5)[1]
    assert not torch.allclose(a, c)


def test_cache_hit_returns_identical_tensors_without_recomputing(tiny_lm, tmp_path):
    texts = neutral_lines()
    first = covariance(tiny_lm, [1, 2], texts=texts, tokens=300, cache_dir=tmp_path)
    files = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2
    events = []
    second = covariance(tiny_lm, [1, 2], texts=texts, tokens=300, cache_dir=tmp_path, emit=events.append)
    for layer in (1, 2):
        assert torch.equal(first[layer], second[layer])
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and all(e.message == "cached" for e in progress)
    # A different budget is a different cache entry.
    covariance(tiny_lm, [1], texts=texts, tokens=200, cache_dir=tmp_path)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 3


def test_corrupted_cache_file_is_detected_and_recomputed(tiny_lm, tmp_path, caplog):
    texts = neutral_lines()
    good = covariance(tiny_lm, [2], texts=texts, tokens=300, cache_dir=tmp_path)[2]
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-20:] = bytes(20)  # zero some covariance bytes: shape is intact, the checksum is not
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="detox_tui.backends.stats"):
        again = covariance(tiny_lm, [2], texts=texts, tokens=300, cache_dir=tmp_path)[2]
    assert torch.equal(good, again)
    assert "recomputing" in caplog.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detox_tui.backends.stats"):
        third = covariance(tiny_lm, [2], texts=texts, tokens=300, cache_dir=tmp_path)[2]
    assert torch.equal(good, third)
    assert "recomputing" in caplog.text


def test_short_corpus_uses_what_there_is_with_a_warning(tiny_lm, caplog):
    assert default_stats_tokens(tiny_lm) == 20 * tiny_lm.d_mlp
    with caplog.at_level(logging.WARNING, logger="detox_tui.backends.stats"):
        cov = covariance(tiny_lm, [0], texts=neutral_lines()[:3])
    assert "only" in caplog.text and torch.isfinite(cov[0]).all()


def test_layer_out_of_range_and_cancel(tiny_lm):
    with pytest.raises(UserError, match=r"^Layer 9 is out of range: .* has layers 0 to 3\.$"):
        covariance(tiny_lm, [1, 9], texts=neutral_lines())
    cancel = __import__("threading").Event()

    def emit(event):
        if isinstance(event, Progress) and event.done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        covariance(tiny_lm, [1], texts=neutral_lines(), batch_size=2, emit=emit, cancel=cancel)
