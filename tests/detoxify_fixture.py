"""Build a tiny Detoxify checkpoint (BERT, hidden 32, 2 layers) offline, so tests run Detoxify's real loader."""

from __future__ import annotations

from pathlib import Path

import torch

from detox_tui.tiny import INSULT_PAIRS, neutral_lines

# Detoxify "original" class names; detoxify renames toxic/severe_toxic/identity_hate on load.
ORIGINAL_CLASSES = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
# What DetoxifyScorer should report for ORIGINAL_CLASSES.
ORIGINAL_ATTRIBUTES = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")


def _data_lines(name: str) -> list[str]:
    path = Path(__file__).resolve().parent.parent / "detox_tui" / "data" / name
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def toxic_texts() -> list[str]:
    return _data_lines("toxic_sentences.txt") + [p + insult for p, insult, _ in INSULT_PAIRS]


def clean_texts() -> list[str]:
    return _data_lines("nontoxic_sentences.txt") + neutral_lines() + [p + safe for p, _, safe in INSULT_PAIRS]


def _build_tokenizer(texts: list[str], out_dir: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=special, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_detoxify(
    out_dir: str | Path,
    classes: tuple[str, ...] = ORIGINAL_CLASSES,
    train_steps: int = 20,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out_dir/tiny-detoxify.ckpt`` and a config+tokenizer dir; return (checkpoint, config_dir).

    The checkpoint has Detoxify's layout ({"config": {"arch": ..., "dataset": ...}, "state_dict": ...}) and
    loads with ``Detoxify("original", checkpoint=ckpt, huggingface_config_path=config_dir)`` offline. With
    ``train_steps`` > 0 every class head is trained briefly to fire on the builtin toxic sentences and stay
    low on the neutral ones, so tests can check that scores separate the two.
    """
    from transformers import BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    config_dir = out_dir / "tiny-bert"
    config_dir.mkdir(parents=True, exist_ok=True)
    toxic, clean = toxic_texts(), clean_texts()
    tokenizer = _build_tokenizer(toxic + clean, config_dir)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(classes),
        problem_type="multi_label_classification",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    config.save_pretrained(config_dir)

    if train_steps > 0:
        texts = toxic + clean
        labels = torch.tensor([1.0] * len(toxic) + [0.0] * len(clean)).unsqueeze(1).expand(-1, len(classes))
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(train_steps):
            logits = model(**batch).logits
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            optim.zero_grad()
            loss.backward()
            optim.step()
        model.eval()

    checkpoint = out_dir / "tiny-detoxify.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": str(config_dir),
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizerFast",
                        "num_classes": len(classes),
                    }
                },
                "dataset": {"args": {"classes": list(classes)}},
            },
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
        checkpoint,
    )
    return checkpoint, config_dir
