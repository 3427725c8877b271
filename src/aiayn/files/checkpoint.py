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
from torch.overrides import TorchFunctionMode
from safetensors.torch import load_file, save_file

from aiayn.files.atomic import atomic_write_bytes, publish, reporting_full_disk
from aiayn.config import ModelConfig
from aiayn.model.transformer import Transformer
from aiayn.files.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# --- model directories -----------------------------------------------------------------------


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in `value` (nested dicts / lists): about what saving it writes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _atomic_save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_full_disk(path, _tensor_bytes(state)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def remove_leftovers(directory: str | Path) -> list[str]:
    """Delete what killed writes left behind in a model or run directory (temporary files and
    checkpoint directories that were never renamed into place); returns their names."""
    directory = Path(directory)
    removed = []
    for parent in (directory, directory / CHECKPOINT_DIR):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            temporary = path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()
            if temporary or (path.is_dir() and path.name.startswith((".tmp_", ".old_"))):
                _remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(directory)))
    return sorted(removed)


def save_model(
    model: Transformer, tokenizer: Tokenizer, directory: str | Path, info: dict[str, Any] | None = None
) -> Path:
    """Write a self-contained model directory: weights, config.json (model config + `info`,
    e.g. languages) and the tokenizer. Each file is replaced atomically."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_save_weights(_unwrap(model).state_dict(), directory / WEIGHTS_FILE,
                             {"format_version": str(FORMAT_VERSION)})
        tokenizer.save(directory)
        config = {"format_version": FORMAT_VERSION, "model": _unwrap(model).config.to_dict(), "info": info or {}}
        atomic_write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
    except BaseException:
        if created:  # a directory this call made holds no half model
            _remove_tree(directory)
        raise
    return directory


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, info) from a model directory's config.json, with clear errors.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: config.json is not valid JSON, has another format_version, or holds no valid
            model configuration (the message names the file and the bad value).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: {path} is missing")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object with 'format_version' and 'model', "
                         f"got a {type(config).__name__}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: 'model' must be an object of ModelConfig fields, got {config.get('model')!r:.60}")
    info = config.get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"{path}: 'info' must be an object, got {info!r:.60}")
    try:
        return ModelConfig.from_dict(config["model"]), info
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


class _MetaWithoutReferenceOps(TorchFunctionMode):
    """The meta device without PyTorch's Python reference ops, whose first call imports
    torch._dynamo (seconds of every command's start-up). Only shapes matter here, so random
    initialisers return their tensor and random factories an empty one; `arange` (the positional
    tables' factory without a C++ meta kernel) runs on the CPU, and what is computed from it there
    (a table of positions x d_model) is copied into a meta tensor, that is, dropped. Per thread.
    The learned and relative encodings still do meta arithmetic (their tables are scaled random
    parameters), so loading them pays that import once; the paper's sinusoids, RoPE, ALiBi and
    none do not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("normal_", "uniform_", "trunc_normal_"):
            return args[0] if args else kwargs["tensor"]
        if func in (torch.randn, torch.rand):
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        if func is torch.arange:
            return func(*args, **{**kwargs, "device": "cpu"})
        return func(*args, **kwargs)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a Transformer with `config`, without allocating it (meta device)."""
    with torch.device("meta"), _MetaWithoutReferenceOps():
        model = Transformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_weights_file(path: Path, config: ModelConfig) -> dict[str, str]:
    """Check a safetensors file's header against `config` before anything is allocated: every
    parameter present, with its shape, and nothing else. Returns the file's metadata.

    Raises:
        ValueError: not a safetensors file (truncated, empty, another format) or a mismatch.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not match config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{path}: {name} has shape {list(shapes[name])} but config.json implies {list(shape)}")
    return metadata


def _read_weights(
    path: Path, config: ModelConfig | None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The checked weights of a safetensors file (header first, against `config` where given;
    then values: all finite)."""
    from safetensors import SafetensorError

    if config is not None:
        check_weights_file(path, config)
    try:
        weights = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: {name} holds {bad} NaN or infinite values; the model cannot translate "
                             "(was it saved from a run that diverged?)")
    return weights


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", weights_file: str = WEIGHTS_FILE
) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, info) from a model directory. No training state needed.

    The directory may come from anyone: config.json is bounded (`ModelConfig`), the weights'
    header is checked against it before the model is built, and NaN / infinite weights are refused.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is corrupt or does not match config.json (named in the message).
    """
    directory = Path(directory)
    config, info = read_model_config(directory)
    weights = directory / weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no weights: {weights} is missing")
    state = _read_weights(weights, config)
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} pieces but the model expects {config.vocab_size}"
        )
    model = Transformer(config)
    model.load_state_dict(state)
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
    rename (both files fsynced first), then delete all but the newest `keep_last`. `state` is the
    training state (`fit` saves step, data position, optimizer, random states, best BLEU, elapsed
    seconds and the run's id, which also goes into the weights' metadata for `average_run`)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:08d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    with reporting_full_disk(final, _tensor_bytes(weights) + _tensor_bytes(state)):
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
        try:
            metadata = {"format_version": str(FORMAT_VERSION), "step": str(state["step"])}
            if state.get("run_id"):
                metadata["run_id"] = str(state["run_id"])
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata=metadata)
            # Through a file object: PyTorch's writer then raises the OSError of a full disk,
            # where given a path it says only "unexpected pos".
            with open(tmp / STATE_FILE, "wb") as handle:
                torch.save(state, handle)
            if final.exists():  # the same step saved again (e.g. at the end of a run): replace it
                old = root / f".old_{final.name}"
                os.replace(final, old)
                _remove_tree(old)
            publish(tmp, final, mode=0o777)
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
            if name in total and tensor.shape != total[name].shape:
                raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}, {paths[0]} has "
                                 f"{list(total[name].shape)}")
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (tensor / len(paths)).float() for name, tensor in total.items()}


def average_run(run_dir: str | Path, last: int, out_dir: str | Path) -> list[Path]:
    """Average the newest `last` checkpoints of a run into a model directory `out_dir`.

    Every checkpoint is checked first: readable, shaped as the run's config.json says, finite,
    and written by the same run (the run id in its metadata), so that a directory holding the
    leftovers of an earlier run is never averaged into a chimera.

    Raises:
        ValueError: `last` < 1, or a checkpoint that fails a check (named).
        FileNotFoundError: no checkpoints.
    """
    if not isinstance(last, int) or last < 1:
        raise ValueError(f"--last must be >= 1 (the number of newest checkpoints to average), got {last}")
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)[-last:]
    if not paths:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR} holds no checkpoints")
    config, info = read_model_config(run_dir)
    # The headers (names, shapes, run id) are checked before any weights are read, and the
    # weights are read once, by the averaging.
    runs = {path.name: check_weights_file(path / WEIGHTS_FILE, config).get("run_id") for path in paths}
    if len(set(runs.values())) > 1:
        raise ValueError(f"{run_dir / CHECKPOINT_DIR}: the checkpoints come from different runs (run ids {runs}); "
                         "average checkpoints of one run")
    average = average_checkpoints(paths)
    if not all(bool(torch.isfinite(tensor).all()) for tensor in average.values()):
        for path in paths:  # a NaN / inf in one of them: name it (read again, on this error path only)
            _read_weights(path / WEIGHTS_FILE, config)
    model = Transformer(config)
    model.load_state_dict(average)
    save_model(model, Tokenizer.load(run_dir), out_dir, {**info, "averaged": [p.name for p in paths]})
    return paths


def _read_state(path: Path) -> dict[str, Any]:
    import warnings

    try:
        with warnings.catch_warnings():  # a damaged file also makes the unpickler warn
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling a damaged file raises many kinds
        raise ValueError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a training state")
    return state


def latest_checkpoint(
    run_dir: str | Path, device: str | torch.device = "cpu", *, set_aside: bool = True,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(path, model weights on `device`, training state) of a run's newest intact checkpoint:
    what `fit(resume=True)` continues from. The training state holds step, data position,
    optimizer, every rank's random states, best BLEU, elapsed seconds and the run id
    (`save_checkpoint`).

    A newer checkpoint that cannot be read (a power loss before its data reached the disk) is
    skipped with a warning and, with `set_aside`, renamed to checkpoints/.broken_step_N so that
    `average` and later resumes do not trip over it again.

    Raises:
        FileNotFoundError: the run has no checkpoint.
        ValueError: no checkpoint of the run can be read.
    """
    import warnings

    paths = checkpoint_paths(run_dir)
    if not paths:
        raise FileNotFoundError(f"--resume: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
    config = read_model_config(run_dir)[0] if (Path(run_dir) / CONFIG_FILE).is_file() else None
    problems = []
    for path in reversed(paths):
        try:
            state = _read_state(path / STATE_FILE)
            weights = _read_weights(path / WEIGHTS_FILE, config, device)
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"{path.name}: {error}")
            continue
        if problems:
            warnings.warn(f"skipped {len(problems)} unreadable checkpoint(s), resuming from {path.name}: "
                          + "; ".join(problems), stacklevel=2)
            if set_aside:
                for broken in paths[paths.index(path) + 1:]:
                    os.replace(broken, broken.parent / f".broken_{broken.name}")
        return path, weights, state
    raise ValueError(f"--resume: no checkpoint of {run_dir} can be read: " + "; ".join(problems))


RUN_FILES = (WEIGHTS_FILE, CONFIG_FILE, Tokenizer.MODEL_FILE, "train_config.json", "log.jsonl", "curves.png",
             CHECKPOINT_DIR)


def prepare_run_directory(out_dir: str | Path, *, overwrite: bool = False) -> list[str]:
    """Make sure a new training run may write into `out_dir`: it must be missing or empty, or
    `overwrite` must be given, in which case the files of an earlier aiayn run are deleted (and
    nothing else). Returns what was deleted.

    Raises:
        FileExistsError: `out_dir` holds files and `overwrite` is false (the message says how to
            resume or replace it).
        NotADirectoryError: `out_dir` is a file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a directory")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not present:
        return []
    if not overwrite:
        what = "a training run" if (out_dir / CHECKPOINT_DIR).is_dir() else (
            "a model" if (out_dir / CONFIG_FILE).is_file() else "other files")
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise FileExistsError(
            f"--out {out_dir} already holds {what} ({shown}); continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )
    removed = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            _remove_tree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed + remove_leftovers(out_dir)


__all__ = [
    "RUN_FILES", "check_weights_file", "expected_shapes", "prepare_run_directory", "remove_leftovers",
    "CHECKPOINT_DIR", "CONFIG_FILE", "FORMAT_VERSION", "STATE_FILE", "WEIGHTS_FILE", "average_checkpoints",
    "average_run", "checkpoint_paths", "latest_checkpoint", "load_model", "read_model_config", "save_checkpoint",
    "save_model",
]
