"""Files of a model and of a training run: model directories, checkpoints, averaging.

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


# --- checkpoints -----------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint is complete once renamed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def save_checkpoint(run_dir: str | Path, model: Transformer, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoints/step_N/{model.safetensors, state.pt} via a temporary directory and one
    rename, then delete all but the newest `keep_last`. `state` is the training state
    (`fit` saves step, data position, optimizer, random states, best BLEU, elapsed seconds)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # the same step saved again (e.g. at the end of a run): replace it
            old = root / f".old_{final.name}"
            os.replace(final, old)
            _remove_tree(old)
        os.replace(tmp, final)
    except BaseException:
        _remove_tree(tmp)
        raise
    for stale in checkpoint_paths(run_dir)[:-keep_last]:
        _remove_tree(stale)
    return final


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the weights of several checkpoints (section 6.1: the last 5 / 20)."""
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights = load_file(str(Path(path) / WEIGHTS_FILE if Path(path).is_dir() else path))
        if total and weights.keys() != total.keys():
            raise ValueError(f"{path} has different parameters from {paths[0]}")
        for name, tensor in weights.items():
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (tensor / len(paths)).float() for name, tensor in total.items()}


def average_run(run_dir: str | Path, last: int, out_dir: str | Path) -> list[Path]:
    """Average the newest `last` checkpoints of a run into a model directory `out_dir`."""
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)[-last:]
    if not paths:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR} holds no checkpoints")
    config, info = read_model_config(run_dir)
    model = Transformer(config)
    model.load_state_dict(average_checkpoints(paths))
    save_model(model, Tokenizer.load(run_dir), out_dir, {**info, "averaged": [p.name for p in paths]})
    return paths


def latest_checkpoint(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(path, model weights on `device`, training state) of a run's newest complete checkpoint:
    what `fit(resume=True)` continues from. The training state holds step, data position,
    optimizer, every rank's random states, best BLEU and elapsed seconds (`save_checkpoint`).

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise FileNotFoundError(f"--resume: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
    latest = paths[-1]
    weights = load_file(str(latest / WEIGHTS_FILE), device=str(device))
    return latest, weights, torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)


__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "FORMAT_VERSION", "STATE_FILE", "WEIGHTS_FILE", "average_checkpoints",
    "average_run", "checkpoint_paths", "latest_checkpoint", "load_model", "read_model_config", "save_checkpoint",
    "save_model",
]
