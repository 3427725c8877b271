"""The `aiayn` command: one entry point, one subcommand per task.

Each subcommand has an `_add_<name>` function that declares its arguments and a `_run_<name>`
function that imports what it needs (so `aiayn --help` stays fast) and does the work.
User errors (bad files, bad options) print one line on stderr and exit with status 2;
set AIAYN_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from aiayn import __version__
from aiayn.allocator import allocation_failure, bound_kernel_caches
from aiayn.files.atomic import write_output
from aiayn.config import CTRANSLATE2_QUANTIZATIONS, EXPORT_TARGETS, PRECISIONS, TRAIN_PRECISIONS, DecodeConfig

# --- train -----------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on parallel text",
                       description="Train a Transformer with the paper's recipe.")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="named data set, e.g. multi30k:de-en")
    data.add_argument("--data-dir", help="local directory of the named data set (else $AIAYN_DATA, cache, download)")
    data.add_argument("--train-src"), data.add_argument("--train-tgt")
    data.add_argument("--valid-src"), data.add_argument("--valid-tgt")
    data.add_argument("--vocab-size", type=int, help="joint BPE vocabulary size (default: the preset's)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", help="a YAML recipe file; command-line options override it")
    which.add_argument("--recipe", help="a recipe shipped with aiayn, by name (`aiayn recipes` lists them), e.g. demo; "
                                        "command-line options override it")
    p.add_argument("--preset", help="model preset: tiny, small, base, big (default small)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --model dropout=0.3 (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --set warmup_steps=2000 (repeatable)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-epochs", type=float)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--max-tflop", type=float,
                   help="stop after this much training compute (1e12 FLOPs of forward + backward)")
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--accumulate", type=int)
    p.add_argument("--lr-scale", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--precision", choices=TRAIN_PRECISIONS,
                   help="auto (default): bf16 autocast where it is native and measured faster, else fp32")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run or model already in --out (without it, a non-empty --out is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from aiayn.training.recipe import train_from_args

    train_from_args(args)
    return 0


# --- average ---------------------------------------------------------------------------------


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("average", help="average the last N checkpoints of a run into a model directory")
    p.add_argument("--run", required=True, help="a training output directory")
    p.add_argument("--last", type=int, default=5, help="how many of the newest checkpoints (paper: 5)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(handler=_run_average)


def _run_average(args: argparse.Namespace) -> int:
    from aiayn.files.checkpoint import average_run

    paths = average_run(args.run, args.last, args.out)
    print(f"averaged {len(paths)} checkpoints into {args.out}: " + ", ".join(p.name for p in paths))
    return 0


# --- attention / positions (plots) -----------------------------------------------------------


def _index_or(*words: str):
    """argparse type: an int (layer / head index) or one of `words`."""

    def parse(value: str) -> int | str:
        if value in words:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or one of {words}, got {value!r}") from None

    return parse


def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="plot the attention weights of one translation (PNG)",
                       description="Translate SOURCE (or force --target) and plot its attention weights.")
    p.add_argument("source", help="the source sentence")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--target", help="a given translation to score instead of the model's own (beam 4)")
    p.add_argument("--out", required=True, help="PNG to write; with --kind all, OUT.cross.png etc.")
    p.add_argument("--kind", choices=["cross", "encoder", "decoder", "all"], default="cross")
    p.add_argument("--layer", type=_index_or("all"), default=-1, help="0-based layer, -1 = last, or 'all'")
    p.add_argument("--head", type=_index_or("all", "mean"), default="all", help="0-based head, 'all' or 'mean'")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(handler=_run_attention)


def _matplotlib_missing(command: str) -> bool:
    """True (after the one-line error on stderr) when the plotting extra is not installed."""
    from aiayn.visualize import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as error:
        print(f"aiayn {command}: error: {error}", file=sys.stderr)
        return True
    return False


def _run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aiayn.visualize import KINDS, plot_attention_result

    if _matplotlib_missing("attention"):
        return 2
    from aiayn.decoding.translator import Translator

    result = Translator.load(args.model, device=args.device).attention(args.source, args.target)
    out = Path(args.out)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        path = out.with_suffix(f".{kind}{out.suffix or '.png'}") if args.kind == "all" else out
        plot_attention_result(result, kind=kind, layer=args.layer, head=args.head, out=path, dpi=args.dpi)
        print(path)
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="walk one sentence through the model, step by step, with its numbers",
                       description="Show each step of one attention head on a real sentence, as lectures do: "
                                   "embedding + positional encoding, Q, K, V, scores, scaling, mask, softmax, "
                                   "weights x V, concat, W^O, Add & Norm, FFN, and the next-piece distribution.")
    p.add_argument("source", help="the source sentence")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--target", help="a given translation instead of the model's own (beam 4)")
    p.add_argument("--kind", choices=["encoder", "decoder", "cross"], default="encoder",
                   help="which attention to walk (default encoder self-attention)")
    p.add_argument("--layer", type=int, default=0, help="0-based layer, negative from the end (default 0)")
    p.add_argument("--head", type=int, default=0, help="0-based head (default 0)")
    p.add_argument("--decimals", type=int, default=2, help="digits shown in the terminal (default 2)")
    p.add_argument("--top", type=int, default=5, help="next pieces shown per step (default 5)")
    p.add_argument("--json", help="write the chosen head's arrays (full precision) to this JSON file")
    p.add_argument("--html", help="write a self-contained page with every kind, layer and head to this file")
    p.add_argument("--quiet", action="store_true", help="print nothing but the files written")
    p.set_defaults(handler=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    import json

    from aiayn.files.checkpoint import load_model
    from aiayn.explain import explain, format_walk, walk_json, write_html

    for path, option in ((args.json, "--json"), (args.html, "--html")):
        _check_output(path, option)
    if not 0 <= args.decimals <= 12:
        raise ValueError(f"--decimals must be in [0, 12], got {args.decimals}")
    model, tokenizer, _ = load_model(args.model)
    explanation = explain(model, tokenizer, args.source, args.target, top=args.top)
    explanation.head(args.kind, args.layer, args.head)  # a bad layer / head is said before any file is written
    if not args.quiet:
        print(format_walk(explanation, args.kind, args.layer, args.head, decimals=args.decimals))
    if args.json:
        write_output(args.json, json.dumps(walk_json(explanation, args.kind, args.layer, args.head)).encode("utf-8"))
        print(args.json, file=sys.stderr if not args.quiet else sys.stdout)
    if args.html:
        write_html(explanation, args.html)
        print(args.html, file=sys.stderr if not args.quiet else sys.stdout)
    return 0


def _add_positions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("positions", help="plot a positional encoding table or bias (PNG)",
                       description="Plot the sinusoidal encoding, or a model's own: its table (sinusoidal, "
                                   "learned), RoPE's rotation table, ALiBi's bias per head, or the first "
                                   "encoder layer's relative table (Shaw et al.).")
    p.add_argument("--d-model", type=int, help="width of the sinusoidal table (default 512; not with --model)")
    p.add_argument("--length", type=int, default=100, help="number of positions")
    p.add_argument("--model", help="plot this model directory's encoding instead")
    p.add_argument("--similarity", action="store_true", help="add the cosine similarity between positions")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(handler=_run_positions)


def _run_positions(args: argparse.Namespace) -> int:
    from aiayn.visualize import plot_position_bias, plot_positional_encoding

    if _matplotlib_missing("positions"):
        return 2
    if args.length < 1:
        raise ValueError(f"--length must be >= 1, got {args.length}")
    first_row, row_label = 0, "position"
    if args.model:
        import torch

        from aiayn.model.attention import alibi_bias, alibi_slopes
        from aiayn.files.checkpoint import load_model
        from aiayn.model.transformer import sinusoidal_table

        model, _, _ = load_model(args.model)
        config = model.config
        if args.d_model is not None and args.d_model != config.d_model:
            raise ValueError(f"--d-model {args.d_model} differs from the model's d_model {config.d_model}")
        kind = config.positional_encoding
        if kind == "none":
            raise ValueError(f"{args.model} has no positional encoding to plot (positional_encoding: none)")
        if args.length > config.max_positions:
            raise ValueError(f"--length {args.length} exceeds the model's max_positions {config.max_positions}")
        if kind == "alibi":
            positions = torch.arange(args.length)
            bias = alibi_bias(alibi_slopes(config.n_heads), positions, positions)  # [H, P, P]
            print(plot_position_bias(bias, out=args.out, dpi=args.dpi,
                                     title=f"ALiBi bias -m_h |i - j| of {args.model}"))
            return 0
        if kind == "rope":  # cos / sin of pos * theta_i: the sinusoids at the head's width
            table = sinusoidal_table(args.length, config.head_dim)
            title = (f"RoPE rotation (sin, cos of pos x theta_i per pair of a head's {config.head_dim} dims) "
                     f"of {args.model}")
        elif kind == "relative":
            table = model.encoder_layers[0].self_attn.relative_keys  # [2k + 1, D]
            first_row, row_label = -(table.size(0) // 2), "relative distance j - i"
            title = f"relative key table a^K (Shaw et al.), first encoder layer of {args.model}"
        else:
            table = model.positions.weight if kind == "learned" else model.positions.table  # [max_positions, E]
            table = table[: args.length]
            title = f"{kind} positional encoding of {args.model}"
    else:
        from aiayn.model.transformer import sinusoidal_table

        d_model = 512 if args.d_model is None else args.d_model
        table = sinusoidal_table(args.length, d_model)
        title = f"sinusoidal positional encoding, d_model = {d_model}"
    print(plot_positional_encoding(table, out=args.out, similarity=args.similarity, title=title, dpi=args.dpi,
                                   first_row=first_row, row_label=row_label))
    return 0


# --- serve -----------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP translation API and attention web page (needs aiayn[serve])",
                       description="Serve a model over HTTP: POST /translate, POST /attention, GET /health, "
                                   "GET /info, the page at /, OpenAPI docs at /docs.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    from aiayn.serve.limits import MAX_BATCH_SENTENCES, MAX_WAIT_MS  # light: FastAPI is imported when serving

    p.add_argument("--max-batch-sentences", type=int, default=MAX_BATCH_SENTENCES,
                   help=f"most sentences merged into one model call (default {MAX_BATCH_SENTENCES})")
    p.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS,
                   help=f"how long the worker waits for more requests to merge (default {MAX_WAIT_MS:g})")
    p.add_argument("--no-batching", action="store_true", help="one model call per request (baseline)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_precision_options(p)
    from aiayn.serve.limits import ServerLimits

    limits = p.add_argument_group("limits (what exceeds them is refused with 413, 422 or 503 before the model)")
    defaults = ServerLimits()
    for flag, field, kind, text in (
        ("--max-queue", "max_queue", int, "requests waiting for the model; one more gets 503 + Retry-After"),
        ("--request-timeout", "request_timeout_s", float, "seconds from a request's arrival to its answer"),
        ("--max-connections", "max_connections", int, "open connections"),
        ("--keep-alive", "keep_alive_s", int, "seconds an idle keep-alive connection stays open"),
        ("--read-timeout", "read_timeout_s", float, "seconds for a request's headers and body to arrive"),
        ("--max-body-bytes", "max_body_bytes", int, "request body size"),
        ("--max-chars", "max_chars", int, "characters per sentence"),
        ("--max-texts", "max_texts", int, "sentences per /translate request"),
        ("--max-attention-chars", "max_attention_chars", int, "characters of an /attention sentence"),
        ("--max-attention-weights", "max_attention_weights", int, "numbers in an /attention response"),
        ("--max-request-mb", "max_request_mb", int, "MB one /translate request's decoding may hold (413 above)"),
    ):
        limits.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field),
                            help=f"{text} (default {getattr(defaults, field):g})")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from aiayn.serve.app import serve
    from aiayn.serve.limits import ServerLimits

    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
    _check_port(args.host, args.port)
    serve(args.model, host=args.host, port=args.port, max_batch_sentences=args.max_batch_sentences,
          max_wait_ms=args.max_wait_ms, batching=not args.no_batching, device=args.device,
          precision=args.precision, compile=args.compile, limits=limits)
    return 0


# --- translate / evaluate --------------------------------------------------------------------


def _add_decode_options(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="model directory (from `aiayn train` or `aiayn average`)")
    defaults = DecodeConfig()
    p.add_argument("--beam", type=int, default=defaults.beam_size, help="beam size (paper: 4; 1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=defaults.length_penalty, help="GNMT alpha (paper: 0.6)")
    p.add_argument("--max-len-a", type=float, default=defaults.max_len_a,
                   help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int, default=defaults.max_len_b)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded source pieces per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_precision_options(p)


def _add_precision_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where it is native and measured faster here, else fp32 "
                        "(see `aiayn info`); bf16: weights cast to bfloat16; int8: linear layers in int8 "
                        "arithmetic (CPU only; changes translations slightly)")
    p.add_argument("--compile", action="store_true",
                   help="run the encoder and decoder step through torch.compile: the fastest decoding at "
                        "every precision, after a one-time compilation of about a minute (int8) to a few (fp32, bf16)")


def _decode_config(args: argparse.Namespace, nbest: int = DecodeConfig.nbest) -> DecodeConfig:
    """The search settings of the decode options (checked by DecodeConfig: one validation)."""
    sampling = {name: getattr(args, name) for name in ("sampling_topk", "sampling_topp", "temperature", "seed")
                if hasattr(args, name)}
    return DecodeConfig(beam_size=args.beam, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                        max_len_b=args.max_len_b, nbest=nbest, **sampling)


def _load_translator(args: argparse.Namespace):
    """Translator.load with the decode options; says once on stderr what --precision became."""
    from aiayn.decoding.translator import Translator

    bound_kernel_caches()  # before the first model call, where oneDNN reads them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        translator = Translator.load(args.model, device=args.device, precision=args.precision, compile=args.compile)
    choice = translator.precision_choice
    for other in caught:  # the precision warning is said below, with the choice
        if str(other.message) != choice.message:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    print(f"aiayn {args.command}: {'warning: ' if choice.warning else ''}{choice.message}", file=sys.stderr, flush=True)
    return translator


def _read_input_lines(path: str | None) -> list[str]:
    """Lines of a file (plain or gzipped; empty lines kept) or of stdin, read as UTF-8 (a BOM
    dropped, a bad byte reported with its line)."""
    from aiayn.files.data import read_lines, read_stream

    if path is not None and path != "-":
        return read_lines(path)
    if sys.stdin is None or sys.stdin.closed:
        raise ValueError("stdin is closed: give the sentences on stdin or with --input FILE")
    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:  # a text stream standing in for stdin (tests, embedding applications)
        import io

        binary = io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))
    return read_stream(binary, "<stdin>")


def _write_lines(lines: list[str], path: str | None) -> None:
    """`lines`, one per line, to the file `path` (checked before the work by `_check_output`) or stdout."""
    text = "".join(line + "\n" for line in lines)
    if path:
        write_output(path, text.encode("utf-8"))
    else:
        sys.stdout.write(text)


def _check_output(path: str | None, option: str) -> None:
    """Fail before the work, not after it, where `path` cannot be written."""
    if path is None or path == "-":
        return
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise ValueError(f"{option} {path} is a directory")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise PermissionError(f"{option} {path}: not writable")


def _check_port(host: str, port: int) -> None:
    """Say that the address is taken before the model is loaded (uvicorn would log it after)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise OSError(f"cannot listen on {host}:{port}: {reason}; choose another --port") from None


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate text, one sentence per line",
                       description="Translate line by line (stdin to stdout by default); an empty "
                                   "line gives an empty line.")
    _add_decode_options(p)
    p.add_argument("--nbest", type=int, default=DecodeConfig.nbest,
                   help="print K lines 'i ||| translation ||| score' per input line (i from 0); with sampling, "
                        "K samples")
    p.add_argument("--input", help="source file, plain or .gz (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--prefix", help="file of target prefixes, one per input line (empty = none): each "
                                    "translation starts with its prefix (CTranslate2 target_prefix)")
    p.add_argument("--split-sentences", action="store_true",
                   help="translate each line sentence by sentence (the Moses splitter, in the model's source "
                        "language) and join the translations; a line's score is the sum of its sentences' "
                        "length-normalised scores, alignments count words from the start of the line")
    align = p.add_argument_group("word alignment")
    align.add_argument("--alignment", action="store_true",
                       help="append ' ||| i-j ...' to each output line (Pharaoh: source word i - target word j, "
                            "0-based, whitespace words), from the cross-attention argmax")
    align.add_argument("--alignment-layer", type=int, default=None,
                       help="decoder layer whose cross-attention (mean over heads) aligns (default: the penultimate)")
    sampling = p.add_argument_group("sampling (instead of beam search; --beam is then unused)")
    defaults = DecodeConfig()
    sampling.add_argument("--sampling-topk", type=int, default=defaults.sampling_topk,
                          help="sample from the K most probable pieces (0 = all; default 1 = no sampling)")
    sampling.add_argument("--sampling-topp", type=float, default=defaults.sampling_topp,
                          help="sample from the smallest set of pieces holding probability P (nucleus; default 1)")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature,
                          help="divide the log-probs by T before sampling (default 1)")
    sampling.add_argument("--seed", type=int, default=defaults.seed,
                          help="same seed and sentence, same samples, whatever the batch (default 0)")
    p.set_defaults(handler=_run_translate)


def _run_translate(args: argparse.Namespace) -> int:
    # Check the output and load first: a bad path or model directory is reported before anything
    # waits on stdin or is translated.
    _check_output(args.output, "--output")
    decode = _decode_config(args, nbest=args.nbest)
    prefixes = None
    if args.prefix:
        from aiayn.files.data import read_lines

        prefixes = read_lines(args.prefix)
    translator = _load_translator(args)
    if args.alignment:
        translator.alignment_layer(args.alignment_layer)
    if args.split_sentences and prefixes is not None:
        raise ValueError("--split-sentences and --prefix do not go together: a prefix starts a line's translation, "
                         "not each sentence's")
    lines = _read_input_lines(args.input)
    if prefixes is not None and len(prefixes) != len(lines):
        raise ValueError(f"--prefix {args.prefix} has {len(prefixes)} lines but the input has {len(lines)}")
    if args.split_sentences:
        results, alignments = _translate_sentences(translator, lines, decode, args)
    else:
        results = translator.translate(
            lines, decode, batch_tokens=args.batch_tokens, return_scores=True,
            progress=args.input not in (None, "-"), prefixes=prefixes,
        )
        alignments = None
        if args.alignment:  # one alignment per hypothesis, aligned with its own translation
            flat = [(i, text) for i, entries in enumerate(results) for text, _ in entries]
            pairs = translator.align([lines[i] for i, _ in flat], [text for _, text in flat],
                                     layer=args.alignment_layer, batch_tokens=args.batch_tokens)
            alignments = iter(pairs)

    def aligned(line: str) -> str:  # the alignment last, so that readers of the other fields still work
        if alignments is None:
            return line
        alignment = next(alignments)
        return f"{line} ||| {alignment}" if line or alignment else ""  # an empty line stays empty

    if args.nbest > 1:
        out = [aligned(f"{i} ||| {text} ||| {score:.4f}") for i, entries in enumerate(results)
               for text, score in entries]
    else:
        out = [aligned(entries[0][0]) for entries in results]
    _write_lines(out, args.output)
    return 0


def _translate_sentences(translator, lines: list[str], decode: DecodeConfig, args: argparse.Namespace):
    """`aiayn translate --split-sentences`: the lines' sentences in one call, then each line put
    back together (`aiayn.decoding.sentences`); the alignments, if asked, per joined hypothesis."""
    from aiayn.decoding.sentences import hypothesis_alignments, join_translations, split_lines

    split = split_lines(lines, translator.info.get("src_lang"))
    per_sentence = translator.translate(split.sentences, decode, batch_tokens=args.batch_tokens, return_scores=True,
                                        progress=args.input not in (None, "-"))
    results = join_translations(split, per_sentence)
    if not args.alignment:
        return results, None
    aligned = hypothesis_alignments(split, per_sentence, lambda sources, targets: translator.align(
        sources, targets, layer=args.alignment_layer, batch_tokens=args.batch_tokens))
    return results, iter([alignment for line in aligned for alignment in line])


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="forced decoding: the model's log-probability of given translations",
                       description="Score each (source, target) pair: its total log-probability, then the mean "
                                   "per piece (target pieces + EOS), tab-separated; the numbers beam search adds "
                                   "up for the same pieces. An empty source gives an empty line.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--src", required=True, help="source file, plain or .gz")
    p.add_argument("--tgt", required=True, help="target file, one translation per source line")
    p.add_argument("--per-token", action="store_true", help="add each piece's log-probability (and EOS's)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded pieces per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_precision_options(p)
    p.set_defaults(handler=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from aiayn.files.data import read_lines

    _check_output(args.output, "--output")
    sources, targets = read_lines(args.src), read_lines(args.tgt)
    if len(sources) != len(targets):
        raise ValueError(f"{args.src} has {len(sources)} lines but {args.tgt} has {len(targets)}")
    translator = _load_translator(args)
    out = []
    for values in translator.score(sources, targets, batch_tokens=args.batch_tokens):
        if values is None:
            out.append("")
            continue
        total = sum(values)
        fields = [f"{total:.4f}", f"{total / len(values):.4f}"]
        if args.per_token:
            fields.append(" ".join(f"{value:.4f}" for value in values))
        out.append("\t".join(fields))
    _write_lines(out, args.output)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="BLEU / chrF / TER of a model (--model --src) or of a file (--hyp)",
                       description="Score translations with sacreBLEU against references.")
    _add_decode_options(p, model_required=False)
    p.add_argument("--src", help="source file to translate (with --model), then score")
    p.add_argument("--hyp", help="file of translations to score (instead of --model/--src)")
    p.add_argument("--ref", required=True, help="reference file, one line per source line")
    p.add_argument("--lowercase", action="store_true", help="also report case-insensitive BLEU")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--save-hyp", help="write the translations of --src to this file")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from aiayn.files.data import read_lines
    from aiayn.evaluate import format_scores, score

    if (args.hyp is None) == (args.model is None):
        raise ValueError("give either --hyp, or --model and --src")
    if args.model is not None and args.src is None:
        raise ValueError("--model needs --src (the source side of --ref)")
    _check_output(args.save_hyp, "--save-hyp")
    references = read_lines(args.ref)
    if args.hyp is not None:
        hypotheses = read_lines(args.hyp)
    else:
        sources = read_lines(args.src)
        if len(sources) != len(references):
            raise ValueError(f"{args.src} has {len(sources)} lines but {args.ref} has {len(references)}")
        translator = _load_translator(args)
        hypotheses = translator.translate(
            sources, _decode_config(args), batch_tokens=args.batch_tokens, progress=True,
        )
        if args.save_hyp:
            _write_lines(hypotheses, args.save_hyp)
    scores = score(hypotheses, references, lowercase=args.lowercase)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))
    return 0


# --- export ----------------------------------------------------------------------------------




def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the model for Hugging Face Marian or CTranslate2",
                       description="Export a model directory: --to marian writes a MarianMTModel directory "
                                   "(from_pretrained), --to ctranslate2 a CTranslate2 model. Both compute the "
                                   "same function; the README says which decoding options reproduce aiayn's "
                                   "output (no </s> on the source, the length penalty, the maximum length).")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="the library to export to")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--quantization", choices=CTRANSLATE2_QUANTIZATIONS,
                   help="ctranslate2 only: weight type (default float32), e.g. int8")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from aiayn.export import export

    out = export(args.model, args.to, args.out, quantization=args.quantization, overwrite=args.overwrite)
    print(f"exported {args.model} to {args.to}: {out}")
    return 0


# --- info ------------------------------------------------------------------------------------


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what this machine can do and the defaults it implies",
                       description="CPU / GPU capabilities (ISA features, native bf16, VNNI) and the precision "
                                   "and speed paths aiayn chooses from them.")
    p.add_argument("--device", default="cpu", help="cpu or cuda: the device to report defaults for")
    p.set_defaults(handler=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from aiayn import allocator, hardware
    from aiayn.inference import fused_beam_step

    caps = hardware.detect()
    for line in caps.report():
        print(line)
    auto = hardware.choose_precision("auto", args.device, capabilities=caps)
    print(f"defaults on {args.device}:")
    if auto.precision == "bf16":
        print(f"  precision auto -> bf16 where it measures at least {hardware.MIN_BF16_SPEEDUP}x faster than "
              f"fp32 on the model at hand ({auto.reason}), else fp32")
    else:
        print(f"  {auto.message}")
    if args.device == "cpu":
        bf16 = hardware.choose_precision("bf16", "cpu", capabilities=caps)
        print(f"  precision bf16: {'native' if not bf16.warning else bf16.reason}")
        int8 = hardware.choose_precision("int8", "cpu", capabilities=caps)
        print(f"  precision int8: {int8.reason if int8.precision == 'int8' else 'fp32 instead: ' + int8.reason}")
        print(f"  oneDNN pre-packed linear layers: fp32 {'yes' if caps.onednn else 'no'}, "
              f"bf16 {'yes' if caps.onednn_bf16 else 'no'}")
        print("  fused C++ beam step: " + ("yes" if fused_beam_step.available() else
                                           "no (it could not be built: torch.log_softmax + beam_step)"))
        print(f"  glibc malloc keeps freed memory: {'yes' if allocator.applicable() else 'no'}")
    return 0


# --- parser ----------------------------------------------------------------------------------

def _add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the training recipes shipped with aiayn",
                       description="The recipes `aiayn train --recipe NAME` takes, with what each is for.")
    p.set_defaults(handler=_run_recipes)


def _run_recipes(args: argparse.Namespace) -> int:
    from aiayn.training.recipe import describe_recipes

    print("\n".join(describe_recipes()))
    return 0


_SUBCOMMANDS = [_add_train, _add_recipes, _add_average, _add_attention, _add_explain, _add_positions, _add_translate,
                _add_score, _add_evaluate, _add_serve, _add_export, _add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiayn",
        description="The Transformer of 'Attention Is All You Need' as a translation toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"aiayn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    # Warnings (a slow precision here, an overlong line) as one line each, like the errors below.
    saved_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **kw: f"aiayn {args.command}: warning: {message}\n"
    try:
        return _run(args)
    finally:
        warnings.formatwarning = saved_format


def _run(args: argparse.Namespace) -> int:
    if os.environ.get("AIAYN_DEBUG"):
        return args.handler(args)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"aiayn {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError, ImportError, MemoryError) as error:
        # DataError is a ValueError; missing files are OSErrors; a missing optional extra is an
        # ImportError whose message says what to install. One line, no traceback.
        tried = allocation_failure(error)
        message = _one_line(error) if tried is None else _out_of_memory(args, tried)
        print(f"aiayn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a defect of aiayn: still one line, and how to see more
        print(f"aiayn {args.command}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(AIAYN_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return 1


def _out_of_memory(args: argparse.Namespace, tried: int) -> str:
    """What a failed allocation tried and which option makes the next try smaller."""
    what = f"an allocation of {tried / 2**20:,.0f} MiB failed" if tried else "an allocation failed"
    batch = getattr(args, "batch_tokens", None)
    now = f" (now {batch})" if batch else ""
    if args.command == "train":
        advice = (f"lower --batch-tokens{now}, with --accumulate N to keep the tokens per update, "
                  "or train a smaller model")
    elif hasattr(args, "batch_tokens"):
        beam = getattr(args, "beam", None)
        advice = f"lower --batch-tokens{now}" + (f" or --beam (now {beam})" if beam and beam > 1 else "")
    else:
        advice = "give it shorter input or more memory"
    return f"out of memory: {what}; {advice}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:1000] + (" ..." if len(text) > 1000 else "")


if __name__ == "__main__":
    raise SystemExit(main())
