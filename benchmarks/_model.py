"""A randomly initialised model of gpt2-medium's shape (24 x 1024, d_mlp 4096) for the benchmarks."""

from __future__ import annotations

import torch

from detox_tui.backends.models import MODEL_SPECS, LoadedModel
from detox_tui.tiny import INSULT_PAIRS, build_gpt2, build_tokenizer, neutral_lines


def gpt2_medium_shaped(n_layer: int = 24, n_embd: int = 1024, seed: int = 0) -> LoadedModel:
    texts = neutral_lines() + [p + t + s for p, t, s in INSULT_PAIRS]
    tokenizer = build_tokenizer(texts)
    tokenizer.padding_side = "left"
    model = build_gpt2(len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=16, n_positions=256, seed=seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = next(s for s in MODEL_SPECS if s.family == "gpt2")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        name="random-gpt2-medium-shape",
        device=torch.device("cpu"),
    )
