"""Configuration: frozen dataclasses and the model presets.

The presets follow the paper's table 3 (`base`, `big`), plus `small` for Multi30k-sized data and
`tiny` for tests. Special token ids are fixed project-wide (see `aiayn.files.tokenizer`):
pad = 0, unk = 1, bos = 2, eos = 3.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, TypeVar

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
# Precisions: what aiayn.inference.prepare converts a model to, what --precision takes ("auto" is
# resolved by aiayn.hardware), and what training runs in (int8 is for inference only).
MODEL_PRECISIONS = ("fp32", "bf16", "int8")
PRECISIONS = ("auto", *MODEL_PRECISIONS)
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
EXPORT_TARGETS = ("marian", "ctranslate2")  # aiayn.export
CTRANSLATE2_QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                             "bfloat16", "float32")
SCHEDULES = ("inverse_sqrt", "constant", "linear", "cosine", "wsd")  # aiayn.training.optim
OPTIMIZERS = ("adam", "adamw", "sgd", "muon")  # aiayn.training.optim


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """`value` is an int (not a bool, not a float) in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    _check(ok, f"{name} must be an int in [{low}, {high if high is not None else 'inf'}], got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """`value` is a finite real number in [low, high] (or [low, high) with `high_open`)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and low <= value and (value < high if high_open else value <= high))
    _check(ok, f"{name} must be a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


_Config = TypeVar("_Config", bound="_DictConfig")


class _DictConfig:
    """replace / to_dict / from_dict shared by the config dataclasses."""

    def replace(self: _Config, **overrides: Any) -> _Config:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], values: dict[str, Any]) -> _Config:
        """Raises ValueError for a non-mapping, unknown fields, or a bad value (named)."""
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} expects a mapping of field: value, got {type(values).__name__} "
                             f"{values!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ModelConfig(_DictConfig):
    """Shape and regularisation of a Transformer (paper defaults = `base`)."""

    vocab_size: int = 37000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # residual dropout P_drop (paper section 5.4)
    attention_dropout: float = 0.0  # on attention weights; not in the paper (tensor2tensor has it)
    max_positions: int = 1024
    positional_encoding: str = "sinusoidal"  # paper section 3.5; the others are departures (aiayn.model.transformer)
    norm_first: bool = False  # False = post-norm LayerNorm(x + Sublayer(x)) as in the paper
    share_embeddings: bool = True  # source, target and pre-softmax weights tied (section 3.4)
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        # Upper bounds: a model directory may come from anyone, and its config.json is read before
        # its weights; these keep a hostile one from asking for terabytes (`big` is well inside).
        for name, high in MODEL_LIMITS.items():
            _check_int(name, getattr(self, name), 1, high)
        _check(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
        )
        for name in ("dropout", "attention_dropout"):
            _check_number(name, getattr(self, name), 0.0, 1.0, high_open=True)
        _check_bool("norm_first", self.norm_first)
        _check_bool("share_embeddings", self.share_embeddings)
        _check(
            isinstance(self.positional_encoding, str) and self.positional_encoding in POSITIONAL_ENCODINGS,
            f"positional_encoding must be one of {POSITIONAL_ENCODINGS}, got {self.positional_encoding!r}",
        )
        specials = {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in specials.items():
            _check_int(name, value, 0, self.vocab_size - 1)
        _check(len(set(specials.values())) == 4, f"special token ids must differ, got {specials}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (`tiny`, `small`, `base`, `big`) with fields overridden by keyword."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides) if overrides else MODEL_PRESETS[name]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


MODEL_LIMITS = {
    "vocab_size": 1 << 20, "d_model": 16384, "n_heads": 256, "d_ff": 65536, "n_encoder_layers": 128,
    "n_decoder_layers": 128, "max_positions": 1 << 16,
}

MODEL_PRESETS: dict[str, ModelConfig] = {
    # For unit tests: a few thousand parameters, trains in seconds.
    "tiny": ModelConfig(
        vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
        dropout=0.0, max_positions=256,
    ),
    # Multi30k-sized (29k pairs). Small data wants a smaller, more regularised model than `base`:
    # Wu et al. (ACL 2021, "Good for misconceived reasons") reach 41.0 BLEU En->De test2016 with a
    # 4-layer, d=128 "transformer-tiny" and dropout 0.3; Araabi & Monz (COLING 2020) find fewer
    # heads / layers, more dropout and a ~10k BPE vocabulary best below 100k pairs. We take the
    # middle: d=256, 4 heads, 3+3 layers, ~7M parameters with an 8k joint vocabulary.
    "small": ModelConfig(
        vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3,
        dropout=0.2, attention_dropout=0.1, max_positions=256,
    ),
    # Paper table 3, "base": 65M parameters with a 37k shared BPE vocabulary.
    "base": ModelConfig(
        vocab_size=37000, d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6,
        dropout=0.1,
    ),
    # Paper table 3, "big": 213M parameters; P_drop = 0.3 for En-De (0.1 for En-Fr).
    "big": ModelConfig(
        vocab_size=37000, d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6,
        dropout=0.3,
    ),
}


# Decoding bounds, so that a typo cannot ask for hours of search; a request to the server, which
# shares one model among its clients, is bounded tighter.
MAX_BEAM_SIZE = 128  # beam size, and samples per sentence
SERVER_MAX_BEAM_SIZE = 16  # per HTTP request: beams, and samples per sentence
SERVER_MAX_SAMPLING_TOPK = 100_000
MAX_LENGTH_PENALTY = 10.0
MAX_MAX_LEN_A = 10.0
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 63) - 1


def is_sampling(sampling_topk: int, sampling_topp: float) -> bool:
    """Whether these settings sample (CTranslate2's convention): sampling_topk != 1 or sampling_topp < 1."""
    return sampling_topk != 1 or sampling_topp < 1.0


@dataclass(frozen=True)
class DecodeConfig(_DictConfig):
    """Inference settings (paper section 6.1): beam 4, length penalty 0.6, max length = S + 50.

    The one place these defaults live: the CLI, `Translator.translate` and the server's requests
    start from `DecodeConfig()`. Frozen and hashable, so the server groups requests by it.
    """

    beam_size: int = 4
    length_penalty: float = 0.6
    max_len_a: float = 1.0  # max output length = max_len_a * source length + max_len_b
    max_len_b: int = 50
    nbest: int = 1  # hypotheses per sentence (with sampling: independent samples)
    # Random sampling instead of beam search (CTranslate2's convention): on when sampling_topk != 1
    # or sampling_topp < 1; topk 0 = the whole vocabulary. beam_size is then unused.
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    temperature: float = 1.0
    seed: int = 0  # with the sentence, it fixes its samples (`Translator.translate`)

    def __post_init__(self) -> None:
        _check_int("beam_size", self.beam_size, 1, MAX_BEAM_SIZE)
        _check_number("length_penalty", self.length_penalty, 0.0, MAX_LENGTH_PENALTY)
        _check_int("nbest", self.nbest, 1, MAX_BEAM_SIZE if self.sampling else self.beam_size)
        _check_number("max_len_a", self.max_len_a, 0.0, MAX_MAX_LEN_A)
        _check_int("max_len_b", self.max_len_b, 0, MODEL_LIMITS["max_positions"])
        _check_int("sampling_topk", self.sampling_topk, 0, MODEL_LIMITS["vocab_size"])
        _check_number("sampling_topp", self.sampling_topp, 0.0, 1.0)
        _check(self.sampling_topp > 0, f"sampling_topp must be > 0, got {self.sampling_topp}")
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check_int("seed", self.seed, 0, MAX_SEED)

    @property
    def sampling(self) -> bool:
        """Whether translations are sampled (`aiayn.decoding.search.Sampling`) rather than searched."""
        return is_sampling(self.sampling_topk, self.sampling_topp)


PAPER_DECODE = DecodeConfig()  # beam 4, length penalty 0.6, max length S + 50 (section 6.1)


@dataclass(frozen=True)
class TrainConfig(_DictConfig):
    """Optimisation and bookkeeping (paper section 5). Defaults are the paper's WMT settings."""

    batch_tokens: int = 25000  # per batch: rows x max(padded source, padded target) length
    accumulate: int = 1  # batches per update: reach 25k-token batches on one device
    optimizer: str = "adam"  # one of OPTIMIZERS (aiayn.training.optim); the paper's is Adam
    schedule: str = "inverse_sqrt"  # one of SCHEDULES (aiayn.training.optim); the paper's is inverse_sqrt
    lr_scale: float = 1.0  # inverse_sqrt: lrate = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    warmup_steps: int = 4000  # inverse_sqrt's warmup in updates
    # The budgeted schedules: peak rate (None = inverse_sqrt's peak for lr_scale and warmup_steps),
    # warmup over this fraction of the budget's updates, and wsd's final decay fraction.
    peak_lr: float | None = None
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    sgd_momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0 = no gradient clipping (the paper does not clip)
    max_steps: int | None = None
    max_epochs: float | None = None
    max_minutes: float | None = None
    max_tflop: float | None = None  # a budget in training compute (aiayn.training.compute), 1e12 FLOPs
    max_sentence_tokens: int = 250  # longer training pairs are skipped (and counted)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where native and faster: aiayn.hardware)
    device: str = "cpu"
    seed: int = 1
    threads: int | None = None
    log_every: int = 50
    eval_every: int = 1000  # validation loss + BLEU every N updates (0 = only at the end)
    save_every: int = 1000  # checkpoint every N updates (and always at the end)
    keep_last: int = 5  # checkpoints kept on disk (the paper averaged the last 5)
    valid_beam: int = 1  # beam size for validation BLEU (1 = greedy, fast)
    valid_max_sentences: int | None = None  # BLEU on a prefix of the validation set
    # Under torchrun: how long a collective waits for a rank that stopped answering before every
    # rank fails (PyTorch's default is 30 minutes, during which a hung rank blocks the others).
    distributed_timeout_s: int = 300

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "accumulate", "warmup_steps", "log_every", "keep_last", "valid_beam",
                     "max_sentence_tokens"):
            _check_int(name, getattr(self, name), 1)
        _check_int("valid_beam", self.valid_beam, 1, MAX_BEAM_SIZE)
        for name in ("eval_every", "save_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_int("distributed_timeout_s", self.distributed_timeout_s, 1)
        for name in ("threads", "max_steps", "valid_max_sentences"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_number("lr_scale", self.lr_scale, 0.0, math.inf)
        _check(self.lr_scale > 0, f"lr_scale must be > 0, got {self.lr_scale}")
        _check(isinstance(self.optimizer, str) and self.optimizer in OPTIMIZERS,
               f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(isinstance(self.schedule, str) and self.schedule in SCHEDULES,
               f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.peak_lr is not None:
            _check_number("peak_lr", self.peak_lr, 0.0, 100.0)
            _check(self.peak_lr > 0, f"peak_lr must be > 0, got {self.peak_lr}")
        _check_number("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _check_number("decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check(self.schedule == "inverse_sqrt" or any(
            getattr(self, name) is not None for name in ("max_steps", "max_epochs", "max_minutes", "max_tflop")),
            f"schedule {self.schedule} decays to zero at the end of the budget: set max_steps, max_epochs, "
            "max_minutes or max_tflop")
        for name in ("adam_beta1", "adam_beta2", "label_smoothing", "sgd_momentum"):
            _check_number(name, getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("adam_eps", "weight_decay", "clip_norm"):
            _check_number(name, getattr(self, name), 0.0, math.inf)
        _check(isinstance(self.precision, str) and self.precision in TRAIN_PRECISIONS,
               f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        _check(isinstance(self.device, str) and self.device in ("cpu", "cuda"),
               f"device must be cpu or cuda, got {self.device!r}")
        for name in ("max_epochs", "max_minutes", "max_tflop"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                                     and math.isfinite(value)), f"{name} must be a number > 0, got {value!r}")


__all__ = ["ModelConfig", "DecodeConfig", "PAPER_DECODE", "TrainConfig", "MAX_BEAM_SIZE", "SERVER_MAX_BEAM_SIZE",
           "SERVER_MAX_SAMPLING_TOPK", "MAX_LENGTH_PENALTY", "MAX_MAX_LEN_A", "MAX_TEMPERATURE", "MAX_SEED",
           "MODEL_LIMITS", "MODEL_PRESETS", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "is_sampling"]
