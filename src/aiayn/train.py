"""Training (paper section 5): loss, schedule, train step, fit(), checkpoints and averaging.

Shape legend: B batch, S source length, T target length, N non-padding target tokens, V vocab.

Files:
    model directory   model.safetensors + config.json + tokenizer.model (loads with no training state)
    run directory     a model directory (the best checkpoint by validation BLEU) plus
                      checkpoints/step_XXXXXXX/{model.safetensors, state.pt}, log.jsonl, curves.png
Every file is written to a temporary name and renamed into place, so a crash never leaves half a
checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aiayn.config import ModelConfig
from aiayn.model import Transformer
from aiayn.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# --- model directories -----------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: Transformer, tokenizer: Tokenizer, directory: str | Path, info: dict[str, Any] | None = None
) -> Path:
    """Write a self-contained model directory: weights, config.json (model config + `info`,
    e.g. languages) and the tokenizer. Each file is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save_weights(_unwrap(model).state_dict(), directory / WEIGHTS_FILE, {"format_version": str(FORMAT_VERSION)})
    tokenizer.save(directory)
    config = {"format_version": FORMAT_VERSION, "model": _unwrap(model).config.to_dict(), "info": info or {}}
    _atomic_write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    return directory


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, info) from a model directory's config.json, with clear errors."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: {path} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return ModelConfig.from_dict(config["model"]), config.get("info", {})


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", weights_file: str = WEIGHTS_FILE
) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, info) from a model directory. No training state needed."""
    directory = Path(directory)
    config, info = read_model_config(directory)
    weights = directory / weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no weights: {weights} is missing")
    model = Transformer(config)
    model.load_state_dict(load_file(str(weights), device="cpu"))
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} pieces but the model expects {config.vocab_size}"
        )
    return model.to(device).eval(), tokenizer, info


def _unwrap(model: torch.nn.Module) -> Transformer:
    """The Transformer inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
