"""Recipes and the command line of training: a YAML recipe (a file, or one shipped with aiayn by
name: `aiayn/recipes/`, which the repository's `configs/` points to), `--set` / `--model`
overrides, the data and tokenizer, then `aiayn.training.loop.fit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aiayn import hardware
from aiayn.config import ModelConfig
from aiayn.files.checkpoint import (
    prepare_run_directory,
    read_model_config,
)
from aiayn.files.tokenizer import Tokenizer
from aiayn.model.transformer import Transformer
from aiayn.training.loop import fit
from aiayn.training.train import distributed_context

# --- command line ----------------------------------------------------------------------------

_STOPPING = {"max_steps": "max_steps", "max_epochs": "max_epochs", "max_minutes": "max_minutes",
             "max_tflop": "max_tflop"}
_FLAGS = {
    "batch_tokens": "batch_tokens", "accumulate": "accumulate", "lr_scale": "lr_scale",
    "warmup_steps": "warmup_steps", "precision": "precision", "device": "device", "seed": "seed",
    "threads": "threads", **_STOPPING,
}


def _key_values(pairs: list[str], option: str) -> dict[str, Any]:
    import yaml

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE, got {pair!r}")
        try:
            values[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"{option} {pair!r}: the value is not valid YAML ({_one_line(error)})") from None
    return values


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: keys data, data_dir, preset, vocab_size, model: {...}, train: {...}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {_one_line(error)}") from None
    recipe = {} if recipe is None else recipe
    allowed = {"data", "data_dir", "preset", "vocab_size", "model", "train", "description"}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping with keys {sorted(allowed)}, not a {type(recipe).__name__}")
    unknown = sorted(set(recipe) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    for section in ("model", "train"):
        if not isinstance(recipe.get(section, {}), dict):
            raise ValueError(f"{path}: '{section}' must be a mapping of field: value, "
                             f"not a {type(recipe[section]).__name__}")
    return recipe


def recipes() -> dict[str, Path]:
    """The recipes shipped with aiayn (package data, so an installed wheel has them): name -> file."""
    from importlib.resources import files

    root = files("aiayn") / "recipes"
    found = sorted(entry.name for entry in root.iterdir() if entry.name.endswith(".yaml"))
    return {name.removesuffix(".yaml"): Path(str(root / name)) for name in found}


def find_recipe(name: str) -> Path:
    """A shipped recipe by its name, or by the end of its name when only one ends so
    ("demo" -> multi30k-de-en-demo).

    Raises:
        ValueError: no recipe, or several, answer to `name` (the message lists them).
    """
    known = recipes()
    if name in known:
        return known[name]
    matches = [known_name for known_name in known if known_name.endswith(f"-{name}")]
    if len(matches) == 1:
        return known[matches[0]]
    if matches:
        raise ValueError(f"recipe {name!r} is ambiguous: {', '.join(matches)}")
    raise ValueError(f"no recipe named {name!r}; the recipes are {', '.join(known)} (`aiayn recipes` describes them)")


def describe_recipes() -> list[str]:
    """`aiayn recipes`: each shipped recipe's name, data set and description."""
    import textwrap

    lines = []
    for name, path in recipes().items():
        recipe = load_recipe(path)
        lines.append(f"{name}  ({recipe.get('data', 'your own data')}, preset {recipe.get('preset', 'small')})")
        lines += textwrap.wrap(" ".join(str(recipe.get("description", "")).split()), 96,
                               initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    return lines


def train_from_args(args) -> dict[str, Any]:
    """`aiayn train`: resolve data, tokenizer, model and train config, then `fit`."""
    from aiayn.config import TrainConfig
    from aiayn.files.data import encode_parallel, multi30k_paths, parse_data_spec, read_parallel

    if getattr(args, "recipe", None):
        args.config = str(find_recipe(args.recipe))
    recipe = load_recipe(args.config) if args.config else {}
    out_dir = Path(args.out)
    flags = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None}

    if args.resume:
        saved = out_dir / "train_config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} is missing (was {out_dir} written by aiayn train?)")
        try:
            train_config = TrainConfig.from_dict(json.loads(saved.read_bytes().decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{saved}: {_one_line(error)}") from None
        # Only the stopping rules may change on resume; everything else must match the run.
        train_config = train_config.replace(**{k: v for k, v in flags.items() if k in _STOPPING})
    else:
        # The command's default precision is "auto" (TrainConfig's, for library callers, is fp32).
        train_values = {"precision": "auto", **recipe.get("train", {}), **_key_values(args.set, "--set"), **flags}
        train_config = TrainConfig.from_dict(train_values)
    hardware.check_device(train_config.device)
    rank, world, _ = distributed_context(train_config.device, train_config.distributed_timeout_s)
    overwrite = getattr(args, "overwrite", False)
    if args.resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if rank == 0 and not args.resume and not overwrite:  # refused before anything is read: never mix two runs
        prepare_run_directory(out_dir)

    spec = args.data or recipe.get("data")
    data_dir = args.data_dir or recipe.get("data_dir")
    if spec:
        _, src_lang, tgt_lang = parse_data_spec(spec)
        train_paths = multi30k_paths(src_lang, tgt_lang, "train", data_dir)
        valid_paths = multi30k_paths(src_lang, tgt_lang, "val", data_dir)
    else:
        if not (args.train_src and args.train_tgt):
            raise ValueError("give --data multi30k:SRC-TGT or both --train-src and --train-tgt")
        train_paths = (args.train_src, args.train_tgt)
        valid_paths = (args.valid_src, args.valid_tgt) if args.valid_src and args.valid_tgt else None
        src_lang = Path(args.train_src).name.split(".")[-1 if not args.train_src.endswith(".gz") else -2]
        tgt_lang = Path(args.train_tgt).name.split(".")[-1 if not args.train_tgt.endswith(".gz") else -2]
    is_main = rank == 0

    def say(message: str) -> None:
        if is_main:
            print(message, flush=True)

    train_text = read_parallel(*train_paths)
    say(f"train: {len(train_text)} pairs from {train_paths[0]} / {train_paths[1]} "
        f"(skipped {train_text.skipped_empty} with an empty side)")
    valid_text = read_parallel(*valid_paths) if valid_paths else None

    if args.resume:
        model_config, _ = read_model_config(out_dir)
        tokenizer = Tokenizer.load(out_dir)
    else:
        preset = args.preset or recipe.get("preset") or "small"
        model_overrides = {**recipe.get("model", {}), **_key_values(args.model, "--model")}
        vocab_size = args.vocab_size or recipe.get("vocab_size") or ModelConfig.preset(preset).vocab_size
        # The whole model configuration is checked before the tokenizer is trained or saved.
        try:
            ModelConfig.preset(preset, **{**model_overrides, "vocab_size": vocab_size})
        except ValueError as error:
            sources = " and ".join(([f"recipe {args.config}"] if recipe.get("model") else [])
                                   + (["--model"] if args.model else []) + (["--preset"] if args.preset else []))
            raise ValueError(f"model settings{' from ' + sources if sources else ''}: {error}") from None
        if is_main:
            tokenizer = Tokenizer.train(train_text.src + train_text.tgt, vocab_size=vocab_size)
            # Everything is checked by now: the first write (and, with --overwrite, the first delete).
            removed = prepare_run_directory(out_dir, overwrite=overwrite)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {out_dir}")
            tokenizer.save(out_dir)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if not is_main:
            tokenizer = Tokenizer.load(out_dir)
        model_config = ModelConfig.preset(preset, **{**model_overrides, "vocab_size": tokenizer.vocab_size})
        say(f"joint BPE vocabulary: {tokenizer.vocab_size} pieces; model preset {preset!r}")

    train_corpus = encode_parallel(tokenizer, train_text, train_config.max_sentence_tokens)
    say(f"train: {len(train_corpus)} pairs tokenized, {train_corpus.skipped_too_long} skipped as longer than "
        f"{train_config.max_sentence_tokens} tokens")
    valid_corpus = references = None
    if valid_text is not None:
        valid_corpus = encode_parallel(tokenizer, valid_text, model_config.max_positions - 1)
        by_line = dict(zip(valid_text.line_numbers, valid_text.tgt))
        references = [by_line[n] for n in valid_corpus.line_numbers]
        say(f"valid: {len(valid_corpus)} pairs")

    torch.manual_seed(train_config.seed)
    model = Transformer(model_config)
    say(f"model: {model.num_parameters() / 1e6:.2f}M parameters; training on {train_config.device} "
        f"(precision {train_config.precision}), {world} process(es)")
    summary = fit(
        model, tokenizer, train_corpus, train_config, out_dir, valid_corpus=valid_corpus,
        valid_references=references, info={"src_lang": src_lang, "tgt_lang": tgt_lang, "data": spec},
        resume=args.resume, progress=not args.no_progress,
    )
    say(json.dumps({"summary": summary}))
    return summary
