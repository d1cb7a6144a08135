"""Load a causal LM + tokenizer and describe where its family keeps blocks, MLPs, norm and unembedding."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detox_tui.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where an architecture family keeps the modules that editing and tracing touch.

    Paths are dotted attribute paths; ``{}`` in a per-layer template is the block index. ``mlp_out`` is
    the MLP's second linear layer (the out-projection MEMIT/ROME edit); ``mlp_in`` is the linear layer
    whose output is the pre-activation (GPT-2 ``c_fc``). ``conv1d`` is True when linear weights are
    stored as (in, out) (GPT-2's ``Conv1D``). ``logit_softcap`` names the config attribute holding a final
    logit soft-cap (Gemma 2: logits = cap x tanh(logits / cap)); code that reads logits through ``final_norm``
    and ``unembed`` itself must apply it (``unembed_logits``). A tied head needs nothing here: ``unembed``
    is the ``lm_head`` module, whose weight is then the embedding matrix.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    conv1d: bool = False
    logit_softcap: str | None = None

    def block_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp}"

    def mlp_in_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_in}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def attn_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"


# Presets are data: one ModelSpec per family, matched on the HF config's ``model_type``.
MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        mlp="mlp",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        attn="attn",
        conv1d=True,
    ),
    ModelSpec(
        family="gptj",
        model_types=("gptj",),
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        mlp="mlp",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn="attn",
    ),
    ModelSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="embed_out",
        mlp="mlp",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
    ),
    ModelSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
        mlp="mlp",
        mlp_in="mlp.gate_proj",
        mlp_out="mlp.down_proj",
        attn="self_attn",
    ),
    # Gemma: the same module paths as Llama (gated MLP, down_proj = out-projection, tied head), plus
    # pre/post feed-forward norms inside the block, embeddings scaled by sqrt(d) and (Gemma 2) a final
    # logit soft-cap. Its own family so its presets live in their own file.
    ModelSpec(
        family="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
        mlp="mlp",
        mlp_in="mlp.gate_proj",
        mlp_out="mlp.down_proj",
        attn="self_attn",
        logit_softcap="final_logit_softcapping",
    ),
)


def supported_families() -> str:
    return ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in MODEL_SPECS)


def spec_for_model_type(model_type: str) -> ModelSpec:
    for spec in MODEL_SPECS:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"Unsupported model architecture '{model_type}'; supported families are: {supported_families()}."
    )


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path (``transformer.h.3.mlp.c_proj``) to a submodule, with a clear error."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise UserError(f"The model has no module '{path}'; its ModelSpec does not match it.") from exc


def unembed_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final-normed hidden states, as the model's own head computes them (soft-cap included)."""
    logits = get_module(lm.model, lm.spec.unembed)(hidden)
    cap = getattr(lm.model.config, lm.spec.logit_softcap, None) if lm.spec.logit_softcap else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def linear_weight_out_in(module: nn.Module, spec: ModelSpec) -> torch.Tensor:
    """The module's weight as a view in (out_features, in_features) layout, whatever its storage."""
    w = module.weight
    return w.T if spec.conv1d else w


def to_param_layout(delta_out_in: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Turn a delta computed in (out, in) layout into the parameter's own storage layout."""
    return delta_out_in.T.contiguous() if spec.conv1d else delta_out_in.contiguous()


@dataclass
class LoadedModel:
    """A model, its tokenizer and its spec, ready for generation and editing."""

    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    name: str
    device: torch.device
    revision: str | None = None
    # The Jinja chat template prompts are wrapped in (one user turn + the generation prompt), or None for raw
    # prompts; set per run by detox_tui.backends.chat.with_chat_template, never by loading.
    chat_template: str | None = None

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def d_mlp(self) -> int:
        """Width of the MLP (the out-projection's input size)."""
        w = linear_weight_out_in(get_module(self.model, self.spec.mlp_out_path(0)), self.spec)
        return int(w.shape[1])

    @property
    def pad_id(self) -> int:
        """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def module(self, path: str) -> nn.Module:
        return get_module(self.model, path)

    def check_layers(self, layers) -> list[int]:
        """Validate layer indices against the loaded model; one clear sentence on failure."""
        out = []
        for layer in layers:
            if not isinstance(layer, int) or layer < 0 or layer >= self.n_layers:
                raise UserError(
                    f"Layer {layer} is out of range: {self.name} has layers 0 to {self.n_layers - 1}."
                )
            out.append(layer)
        return out

    def identity(self) -> str:
        """A string that identifies these weights for caches: name + revision (or local path mtime)."""
        rev = self.revision or getattr(self.model.config, "_commit_hash", None) or ""
        p = Path(self.name)
        if p.exists():
            stamp = max((f.stat().st_mtime_ns for f in p.glob("*") if f.is_file()), default=0)
            rev = f"{rev}local:{p.resolve()}:{stamp}"
        return f"{self.name}@{rev}"


def pad_batch(
    rows, pad_id: int, device: torch.device, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask) padded on ``side``; right padding keeps natural positions."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def resolve_device(device: str = "auto") -> torch.device:
    """auto -> cuda if available, else mps, else cpu. Asking for an absent accelerator is a UserError."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was requested (--device cuda) but no CUDA device is available on this machine.")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise UserError("MPS was requested (--device mps) but it is not available on this machine.")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise UserError(f"Unknown device '{device}'; use auto, cpu, cuda or mps.")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto -> float16 on CUDA (bf16 where supported), float32 elsewhere."""
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"Unknown dtype '{dtype}'; use auto, float32, float16 or bfloat16.")
    return _DTYPES[dtype]


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Hub downloads are cached by huggingface_hub (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only the cache is
    used. The tokenizer gets a pad token (EOS when missing) and left padding for batched generation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    is_local = Path(name).expanduser().exists()
    if not is_local and (name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name):
        raise UserError(f"The model '{name}' did not load: the directory does not exist.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as exc:
        raise _load_error(name, is_local, offline, exc) from exc
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise UserError(f"The model '{name}' did not load: its config could not be read ({first}).") from exc
    spec = spec_for_model_type(getattr(config, "model_type", "unknown"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except OSError as exc:
        raise _load_error(name, is_local, offline, exc) from exc
    except Exception as exc:  # tokenizers/transformers raise many types for a damaged tokenizer file
        log.debug("tokenizer load failed", exc_info=True)
        raise UserError(
            f"The model '{name}' did not load: its tokenizer could not be read ({_first_line(exc)})."
        ) from exc
    ids = check_tokenizer(name, tokenizer)  # before the weights: a big model is not loaded for nothing
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch_dtype)
    except OSError as exc:
        raise _load_error(name, is_local, offline, exc) from exc
    except Exception as exc:  # safetensors / torch errors for truncated or damaged weight files
        log.debug("model load failed", exc_info=True)
        if isinstance(exc, MemoryError) or "memory" in str(exc).lower():
            raise  # not the file's fault: the CLI names the memory problem
        raise UserError(_weights_error(name, exc)) from exc
    check_token_ids(name, ids, model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s (%s, %s) on %s", name, spec.family, torch_dtype, dev)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, name=name, device=dev, revision=revision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip().rstrip(".") if text else type(exc).__name__


def _weights_error(name: str, exc: Exception) -> str:
    """One sentence for a model whose weights failed to load."""
    text = str(exc)
    if "Weights only load failed" in text and ("GLOBAL" in text or "Can only " in text):
        return (
            f"The model '{name}' did not load: its weights file needs pickle to load, which can run code, so it was "
            "refused; use a copy saved as safetensors."
        )
    damaged = (
        "safetensor" in type(exc).__name__.lower()
        or "deserializ" in text.lower()
        or "Weights only load failed" in text
        or "PytorchStreamReader" in text
        or isinstance(exc, EOFError)
    )
    if damaged:
        return f"The model '{name}' did not load: its weights are damaged or truncated ({_first_line(exc)})."
    return f"The model '{name}' did not load: {_first_line(exc)}."


# Text every usable tokenizer turns into tokens.
_TOKENIZER_PROBE = "Hello, world. The weather is nice today."


def check_tokenizer(name: str, tokenizer) -> list[int]:
    """The ids of a probe text; a tokenizer that cannot encode text is refused (UserError, one sentence).

    A folder without tokenizer files can still give a tokenizer (an empty one): every prompt would become no
    tokens and every continuation ''.
    """
    try:
        ids = [int(i) for i in tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]]
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer can fail in any way
        raise UserError(
            f"The model '{name}' did not load: its tokenizer cannot encode text ({_first_line(exc)})."
        ) from exc
    if not ids:
        raise UserError(
            f"The model '{name}' did not load: it has no usable tokenizer (text encodes to no tokens); the folder "
            "needs its tokenizer files (tokenizer.json, or vocab and merges)."
        )
    return ids


def check_token_ids(name: str, ids: list[int], model: nn.Module) -> None:
    """Refuse a tokenizer whose ids for ordinary text lie beyond the model's embedding rows (another model's)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and max(ids) >= rows:
        raise UserError(
            f"The model '{name}' did not load: its tokenizer does not match the model (token id {max(ids)} but the "
            f"model has {rows} embeddings)."
        )


def _load_error(name: str, is_local: bool, offline: bool, exc: Exception) -> UserError:
    if is_local:
        return UserError(
            f"The model '{name}' did not load: the directory does not hold a loadable model and tokenizer."
        )
    if offline:
        return UserError(
            f"The model '{name}' did not load: it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
            "is set; download it once online or pass a local directory."
        )
    return UserError(
        f"The model '{name}' did not load: it was not found on the Hugging Face hub or as a local directory."
    )


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in name order: equal hashes mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def device_memory(device: torch.device | str | None) -> dict[str, int | None] | None:
    """Memory of a CUDA device for a status bar: allocated, peak and total bytes, and utilisation in percent.

    None for the CPU, MPS or anything CUDA cannot answer for. ``utilisation`` comes from NVML (nvidia-ml-py) when
    it is installed, else None. Cheap (no synchronisation, NVML initialised once) and never raises, so a thread
    may call it every second.
    """
    try:
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
            return None
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return {
            "allocated": int(torch.cuda.memory_allocated(index)),
            "peak": int(torch.cuda.max_memory_allocated(index)),
            "total": int(torch.cuda.get_device_properties(index).total_memory),
            "utilisation": _gpu_utilisation(index),
        }
    except Exception:  # noqa: BLE001 - a status bar must never take the app down
        return None


_NVML: dict[str, object] = {}


def _gpu_utilisation(index: int) -> int | None:
    """The GPU's utilisation in percent from NVML, or None without nvidia-ml-py or when NVML fails."""
    try:
        if "module" not in _NVML:
            _NVML["module"] = None
            import pynvml

            pynvml.nvmlInit()
            _NVML["module"] = pynvml
        nvml = _NVML["module"]
        if nvml is None:
            return None
        # torch's index counts the visible devices; NVML counts them all.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        physical = int(visible[index]) if index < len(visible) and visible[index].strip().isdigit() else index
        handle = nvml.nvmlDeviceGetHandleByIndex(physical)  # type: ignore[attr-defined]
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no NVML, no utilisation
        return None
