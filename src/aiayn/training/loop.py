"""The training loop: fit() as a short list of named steps (set up, start or resume, resolve the
precision, estimate the budget, update until a budget is spent, validate, checkpoint), the run's
resumable state, validation, and the stop signals. One update is `aiayn.training.train.train_step`.
What a run writes (model directory, checkpoints, averaging) is `aiayn.files.checkpoint`'s.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aiayn import hardware
from aiayn.allocator import retain_freed_memory
from aiayn.files.atomic import DiskFullError, atomic_write_bytes, reporting_full_disk
from aiayn.files.checkpoint import (
    _unwrap,
    checkpoint_paths,
    latest_checkpoint,
    remove_leftovers,
    save_checkpoint,
    save_model,
)
from aiayn.files.tokenizer import Tokenizer
from aiayn.model.transformer import Transformer
from aiayn.training.compute import batches_flops, mean_update_flops
from aiayn.training.optim import BudgetEstimate, build_optimizer, learning_rate_for
from aiayn.training.train import (
    TrainingDiverged,
    TranslationLoss,
    all_gather,
    autocast,
    distributed_context,
    state_of_rank,
    train_step,
    training_timings,
)


@dataclass
class TrainingState:
    """Where a run stands, besides weights, optimizer, data position and random state: what a
    checkpoint's state.pt adds to them, and what resume restores."""

    step: int = 0
    best_bleu: float = float("-inf")
    elapsed: float = 0.0  # seconds trained before this process started (earlier, resumed-from runs)
    # Written into every checkpoint, so that `aiayn average` can refuse to mix two runs.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    flops: float = 0.0  # training compute so far (aiayn.training.compute), every process's batches


def save_training_state(
    out_dir: Path, model, optimizer, iterator, state: TrainingState, *, elapsed: float, keep_last: int,
    world: int = 1, rank: int = 0, device: torch.device | None = None,
) -> None:
    """A checkpoint of the run (`aiayn.files.checkpoint.save_checkpoint`): weights, `state` (with
    `elapsed` seconds in all), optimizer, data position, and every rank's random states (CPU, and
    CUDA: each GPU has its own generator), so that a resumed run gives each rank its own back.
    Every rank calls it (the random states are gathered); rank 0 writes."""
    device = device or torch.device("cpu")
    rng = all_gather(torch.get_rng_state(), world, device)
    cuda_rng = all_gather(torch.cuda.get_rng_state(device), world, device) if device.type == "cuda" else None
    if rank != 0:
        return
    save_checkpoint(out_dir, model, {
        "step": state.step, "data": iterator.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
        "cuda_rng": cuda_rng, "best_bleu": state.best_bleu, "elapsed": elapsed, "run_id": state.run_id,
        "flops": state.flops,
    }, keep_last)


def load_training_state(
    out_dir: Path, model, optimizer, iterator, *, rank: int = 0, device: torch.device | None = None,
) -> tuple[TrainingState, Path]:
    """Restore the newest checkpoint of `out_dir` into `model`, `optimizer`, `iterator` and this
    rank's random states; returns (its TrainingState, its path).

    Raises:
        FileNotFoundError: no checkpoint in `out_dir`.
    """
    device = device or torch.device("cpu")
    latest, weights, saved = latest_checkpoint(out_dir, device, set_aside=rank == 0)
    model.load_state_dict(weights)
    optimizer.load_state_dict(saved["optimizer"])
    iterator.load_state_dict(saved["data"])
    torch.set_rng_state(state_of_rank(saved["rng"], rank))
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state_of_rank(saved["cuda_rng"], rank), device)
    # A checkpoint written before run ids and compute were recorded has neither: "" and 0.
    state = TrainingState(step=saved["step"], best_bleu=saved["best_bleu"], elapsed=saved["elapsed"],
                          flops=saved.get("flops", 0.0), run_id=saved.get("run_id", ""))
    return state, latest


def validate(model: Transformer, tokenizer: Tokenizer, valid_corpus, valid_references: list[str] | None, config,
             device: torch.device, state: TrainingState, out_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Validation loss and perplexity, and BLEU where there are references; a better BLEU than
    `state.best_bleu` is recorded there and its model written as the run's model directory.
    Returns the log record ("best": True when it was)."""
    record: dict[str, Any] = {"step": state.step, **evaluate_loss(model, valid_corpus, config, device)}
    if valid_references is not None:
        record["valid_bleu"] = validation_bleu(model, tokenizer, valid_corpus, valid_references, config, device)
        if record["valid_bleu"] > state.best_bleu:
            state.best_bleu = record["valid_bleu"]
            save_model(model, tokenizer, out_dir, {**info, "step": state.step, "valid_bleu": state.best_bleu})
            record["best"] = True
    model.train()
    return record


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after `step` from a run's log.jsonl (they were logged before the
    run was killed, and the resumed run repeats those steps). A torn last line is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def _batch_stream(iterator):
    while True:
        yield from iterator


class _StopRequest:
    """SIGTERM or a first Ctrl-C asks the loop to stop after the current update (a second Ctrl-C
    interrupts at once). The loop then validates and writes a checkpoint, so `--resume` loses nothing.
    Handlers are installed only in the main thread and restored afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this update and saving a checkpoint "
              "(Ctrl-C again to abort)", flush=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup / background jobs keep ignoring
                    self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class _Run:
    """What the steps of `fit` share: the run's parts and where it stands (plain data, no logic)."""

    model: Transformer
    tokenizer: Tokenizer
    config: Any
    out_dir: Path
    criterion: torch.nn.Module
    optimizer: Any
    iterator: Any
    state: TrainingState
    device: torch.device
    rank: int
    world: int
    info: dict[str, Any]
    valid_corpus: Any = None
    valid_references: list[str] | None = None
    started: float = 0.0  # time.monotonic() when this process began training
    updates_here: int = 0  # updates made by this process (a resumed run's earlier ones excluded)
    stop_agreed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seconds(self) -> float:
        """Wall time trained in all, earlier (resumed-from) processes included."""
        return self.state.elapsed + time.monotonic() - self.started

    def epochs(self) -> float:
        return self.iterator.epoch - 1 + self.iterator.position / len(self.iterator)


class _RunLog:
    """log.jsonl (main process only), the progress bar and the lines printed above it."""

    def __init__(self, run: _Run, *, progress: bool) -> None:
        # Unbuffered: a record is one write, so a full disk fails that record's write alone (a torn
        # last line is dropped on resume) and closing has nothing left to flush.
        self.path = run.out_dir / "log.jsonl"
        self.file = open(self.path, "ab", buffering=0) if run.is_main else None  # noqa: SIM115
        self.bar = None
        if run.is_main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.config.max_steps, initial=run.state.step, unit="step", dynamic_ncols=True)

    def record(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            line = (json.dumps(record) + "\n").encode()
            with reporting_full_disk(self.path, len(line)):
                rest = memoryview(line)
                while rest:  # a raw write may be short; the next one raises the error
                    rest = rest[self.file.write(rest):]

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.file is not None:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def fit(
    model: Transformer,
    tokenizer: Tokenizer,
    train_corpus,
    config,
    out_dir: str | Path,
    *,
    valid_corpus=None,
    valid_references: list[str] | None = None,
    info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` on `train_corpus` (an `aiayn.files.data.TokenizedCorpus`) with `config` (TrainConfig).

    Writes to `out_dir`: the model directory of the best validation BLEU (or of the last step when
    there is no validation set), checkpoints/ (last `keep_last`), log.jsonl, train_config.json and
    curves.png. With `resume`, continues from the newest checkpoint exactly where it stopped.
    Under torchrun, each of the world's processes takes its share of every global batch.

    SIGTERM (or a first Ctrl-C) stops the run after the current update, with a final validation and
    checkpoint, like reaching a max_* limit.

    config.precision "auto" is resolved at the start (`aiayn.hardware.choose_precision`, timed by
    `training_timings`) and said on one line; the summary's "precision" is what ran.

    Returns:
        a summary dict: steps, epochs, TFLOP, best validation BLEU, elapsed seconds, tokens/s.
    Raises:
        TrainingDiverged: the loss became NaN / inf (the last good checkpoint is kept).
        FileNotFoundError: `resume` without a checkpoint in `out_dir`.
        DiskFullError: a write found no space; the message names the file and the newest complete
            checkpoint, from which --resume continues once there is space.
    """
    with _saying_where_to_resume(Path(out_dir)):
        run = _set_up(model, tokenizer, train_corpus, config, Path(out_dir), info or {}, valid_corpus,
                      valid_references)
        _start_or_resume(run, resume)
        run.config = _resolve_precision(run, train_corpus)
        budget = _estimate_budget(run, train_corpus)
        log = _RunLog(run, progress=progress)
        stop_request = _StopRequest()
        try:
            stop_request.install()
            total_tokens = _train_until_stopped(run, budget, log, stop_request)
            _validate_and_log(run, log)
            _checkpoint(run)
        finally:
            stop_request.restore()
            log.close()
        return _finish(run, total_tokens)


@contextmanager
def _saying_where_to_resume(out_dir: Path) -> Iterator[None]:
    """A full disk's error, with where the run can go on from once there is space."""
    try:
        yield
    except DiskFullError as error:
        last = checkpoint_paths(out_dir)
        hint = (f"the newest complete checkpoint is {last[-1]}: --resume continues from it" if last
                else "no checkpoint was written yet: run again with --overwrite once there is space")
        raise DiskFullError(error.errno, f"{error.strerror}; {hint}") from None


def _set_up(model, tokenizer, train_corpus, config, out_dir: Path, info, valid_corpus, valid_references) -> _Run:
    """Processes, device, threads, seeds; the loss module (DDP-wrapped), optimizer and batches."""
    import random

    import numpy as np

    from aiayn.files.data import BatchIterator

    rank, world, local_rank = distributed_context(config.device, config.distributed_timeout_s)
    device = torch.device(f"cuda:{local_rank}" if config.device == "cuda" else "cpu")
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":  # no page faults for the activations re-allocated at every step
        retain_freed_memory()
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    model.to(device).train()
    criterion: torch.nn.Module = TranslationLoss(model, label_smoothing=config.label_smoothing)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        criterion = DistributedDataParallel(criterion, device_ids=[local_rank] if device.type == "cuda" else None)
    return _Run(
        model=model, tokenizer=tokenizer, config=config, out_dir=out_dir, criterion=criterion,
        optimizer=build_optimizer(model, config),
        iterator=BatchIterator(train_corpus, config.batch_tokens, shuffle=True, seed=config.seed),
        state=TrainingState(), device=device, rank=rank, world=world, info=info, valid_corpus=valid_corpus,
        valid_references=valid_references,
    )


def _start_or_resume(run: _Run, resume: bool) -> None:
    """A new run writes a loadable model directory at once; `resume` restores the newest checkpoint."""
    out_dir = run.out_dir
    if run.is_main:
        leftovers = remove_leftovers(out_dir)
        if leftovers:
            print(f"removed {len(leftovers)} leftover(s) of an interrupted write: {', '.join(leftovers)}", flush=True)
    if resume:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            run.state, latest = load_training_state(out_dir, run.model, run.optimizer, run.iterator, rank=run.rank,
                                                    device=run.device)
        if run.is_main:
            for warning in skipped:
                print(f"warning: {warning.message}", file=sys.stderr, flush=True)
            print(f"resumed from {latest} (step {run.state.step}, epoch {run.iterator.epoch})", flush=True)
            _truncate_log(out_dir / "log.jsonl", run.state.step)
    elif run.is_main:
        if checkpoint_paths(out_dir):
            raise FileExistsError(f"{out_dir} holds the checkpoints of another run: resume it, or train into "
                                  "an empty directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(run.model, run.tokenizer, out_dir, run.info)  # a loadable directory from the start
        (out_dir / "log.jsonl").unlink(missing_ok=True)
    if run.is_main:
        atomic_write_bytes(out_dir / "train_config.json", json.dumps(run.config.to_dict(), indent=2).encode())


def _first_batches(run: _Run, train_corpus, count: int = 3) -> list:
    from aiayn.files.data import BatchIterator

    stream = iter(BatchIterator(train_corpus, run.config.batch_tokens, shuffle=True, seed=run.config.seed))
    return [batch for _, batch in zip(range(count), stream)]


def _resolve_precision(run: _Run, train_corpus):
    """"auto" is resolved here, on the machine that trains (a resumed run may be on another), timed
    on the run's own first batches. With several processes the choice rests on capability alone,
    so that every rank makes the same one. Returns the config with the precision that will run."""
    config = run.config
    choice = hardware.choose_precision(
        config.precision, run.device,
        timings=None if run.world > 1 else lambda: training_timings(
            run.model, _first_batches(run, train_corpus), run.device, label_smoothing=config.label_smoothing),
    )
    if run.is_main:
        print(f"warning: {choice.message}" if choice.warning else choice.message,
              file=sys.stderr if choice.warning else sys.stdout, flush=True)
    return config.replace(precision=choice.precision)


def _estimate_budget(run: _Run, train_corpus) -> BudgetEstimate:
    """What one update costs in epochs and FLOPs (exact, from every batch of an epoch), and, for a
    budget in minutes under a budgeted schedule, in seconds (probed on the first batches here,
    then measured as the run goes)."""
    config = run.config
    per_update = config.accumulate * run.world
    budget = BudgetEstimate(
        updates_per_epoch=len(run.iterator) / per_update,
        flops_per_update=mean_update_flops(_unwrap(run.model).config, train_corpus, config.batch_tokens, per_update),
    )
    if config.schedule != "inverse_sqrt" and config.max_minutes is not None:
        probe = training_timings(run.model, _first_batches(run, train_corpus, config.accumulate), run.device,
                                 (config.precision,), label_smoothing=config.label_smoothing, repeats=1)
        budget.seconds_per_update = probe[config.precision]
    if run.is_main and config.schedule != "inverse_sqrt":
        total = budget.total_updates(config, step=run.state.step, epochs=run.epochs(), flops=run.state.flops,
                                     seconds=run.state.elapsed)
        print(f"schedule {config.schedule}: about {total:,.0f} updates in the budget "
              f"({budget.flops_per_update / 1e9:,.1f} GFLOP per update; warmup {config.warmup_fraction:.0%} of them)",
              flush=True)
    return budget


def _should_stop(run: _Run) -> bool:
    config, state = run.config, run.state
    return bool(
        run.stop_agreed
        or (config.max_steps is not None and state.step >= config.max_steps)
        or (config.max_epochs is not None and run.epochs() >= config.max_epochs)
        or (config.max_tflop is not None and state.flops >= config.max_tflop * 1e12)
        or (config.max_minutes is not None and run.seconds() >= config.max_minutes * 60)
    )


def _train_until_stopped(run: _Run, budget: BudgetEstimate, log: _RunLog, stop_request: _StopRequest) -> float:
    """Updates until a budget is spent or a stop is asked for; logs every `log_every`, validates
    every `eval_every` and checkpoints every `save_every` updates. Returns the target tokens seen."""
    config, state, model_config = run.config, run.state, _unwrap(run.model).config
    per_update = config.accumulate * run.world
    stream = _batch_stream(run.iterator)
    run.started = time.monotonic()
    window = _Window(time.monotonic())
    total_tokens = 0.0
    while not _should_stop(run):
        group = [next(stream) for _ in range(per_update)]  # every rank walks the same batches
        mine = group[run.rank * config.accumulate : (run.rank + 1) * config.accumulate]
        if run.updates_here >= 3:  # the first updates run slower (allocation, oneDNN's caches)
            budget.seconds_per_update = (run.seconds() - state.elapsed) / run.updates_here
        total = budget.total_updates(config, step=state.step, epochs=run.epochs(), flops=state.flops,
                                     seconds=run.seconds())
        lr = learning_rate_for(config, d_model=model_config.d_model, step=state.step + 1, total_updates=total)
        try:
            loss_sum, nll_sum, tokens, run.stop_agreed = train_step(
                run.criterion, run.optimizer, mine, lr=lr, device=run.device, precision=config.precision,
                world=run.world, clip_norm=config.clip_norm, stop_requested=stop_request.requested,
            )
        except TrainingDiverged as error:
            last = checkpoint_paths(run.out_dir)
            raise TrainingDiverged(
                f"{error} at step {state.step + 1} (lr {lr:.3g}); stopping. Last good checkpoint: "
                f"{last[-1] if last else 'none'}. Try a lower learning rate, a longer warmup, "
                "--set clip_norm=1.0 or fp32."
            ) from None
        state.step += 1
        state.flops += batches_flops(model_config, group)
        run.updates_here += 1
        total_tokens += tokens
        window.add(loss_sum, nll_sum, tokens)
        if state.step % config.log_every == 0 or _should_stop(run):
            _log_window(run, log, window, lr, total)
        if log.bar is not None:
            log.bar.update(1)
        if config.eval_every and state.step % config.eval_every == 0 and not _should_stop(run):
            _validate_and_log(run, log)
        if config.save_every and state.step % config.save_every == 0 and not _should_stop(run):
            _checkpoint(run)
    return total_tokens


@dataclass
class _Window:
    """Loss and tokens since the last log record."""

    start: float
    tokens: float = 0.0
    loss: float = 0.0
    nll: float = 0.0

    def add(self, loss_sum: float, nll_sum: float, tokens: float) -> None:
        self.loss += loss_sum
        self.nll += nll_sum
        self.tokens += tokens


def _log_window(run: _Run, log: _RunLog, window: _Window, lr: float, total_updates: float) -> None:
    now = time.monotonic()
    nll = window.nll / window.tokens
    record = {
        "step": run.state.step, "epoch": round(run.epochs(), 3), "loss": window.loss / window.tokens, "nll": nll,
        "ppl": math.exp(min(nll, 50)), "lr": lr, "tokens_per_s": window.tokens / max(now - window.start, 1e-9),
        "elapsed_s": round(run.seconds(), 1), "tflop": round(run.state.flops / 1e12, 4),
    }
    if math.isfinite(total_updates):
        record["budget_updates"] = round(total_updates)
    log.record(record)
    if log.bar is not None:
        log.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                            ep=f"{record['epoch']:.1f}", tflop=f"{record['tflop']:.1f}",
                            min=f"{record['elapsed_s'] / 60:.1f}")
    window.start, window.tokens, window.loss, window.nll = now, 0.0, 0.0, 0.0


def _validate_and_log(run: _Run, log: _RunLog) -> None:
    if not run.is_main or run.valid_corpus is None:
        return
    record = validate(run.model, run.tokenizer, run.valid_corpus, run.valid_references, run.config, run.device,
                      run.state, run.out_dir, run.info)
    log.record({**record, "epoch": round(run.epochs(), 3), "tflop": round(run.state.flops / 1e12, 4)})
    message = f"step {run.state.step}: valid loss {record['valid_loss']:.3f} ppl {record['valid_ppl']:.2f}"
    if "valid_bleu" in record:
        message += f" BLEU {record['valid_bleu']:.2f}" + (" (best)" if record.get("best") else "")
    log.say(message)


def _checkpoint(run: _Run) -> None:
    save_training_state(run.out_dir, run.model, run.optimizer, run.iterator, run.state,
                        keep_last=run.config.keep_last, world=run.world, rank=run.rank, device=run.device,
                        elapsed=run.seconds())


def _finish(run: _Run, total_tokens: float) -> dict[str, Any]:
    """The model directory where validation did not write one, the curves, and the summary."""
    from aiayn.visualize import plot_curves

    elapsed = run.seconds()
    if run.is_main:
        if run.valid_corpus is None or run.valid_references is None:
            save_model(run.model, run.tokenizer, run.out_dir, {**run.info, "step": run.state.step})
        plot_curves(run.out_dir / "log.jsonl", run.out_dir / "curves.png")
    return {
        "steps": run.state.step, "epochs": run.epochs(), "tflop": round(run.state.flops / 1e12, 4),
        "best_valid_bleu": run.state.best_bleu if run.state.best_bleu > float("-inf") else None,
        "elapsed_s": elapsed, "tokens_per_s": total_tokens / max(elapsed - run.state.elapsed, 1e-9),
        "precision": run.config.precision,
    }


@torch.no_grad()
def evaluate_loss(model: Transformer, corpus, config, device: torch.device) -> dict[str, float]:
    """Validation loss (label-smoothed, as trained) and perplexity (from the plain NLL)."""
    import math

    from aiayn.files.data import BatchIterator

    model.eval()
    criterion = TranslationLoss(model, label_smoothing=config.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    for batch in BatchIterator(corpus, config.batch_tokens, shuffle=False):
        batch = batch.to(device)
        with autocast(device, config.precision):
            loss, nll = criterion(batch.src_tokens, batch.tgt_input, batch.tgt_output)
        loss_sum += loss.item()
        nll_sum += nll.item()
        tokens += batch.num_tgt_tokens
    nll = nll_sum / tokens
    return {"valid_loss": loss_sum / tokens, "valid_nll": nll, "valid_ppl": math.exp(min(nll, 50))}


@torch.no_grad()
def validation_bleu(model: Transformer, tokenizer: Tokenizer, corpus, references: list[str], config, device) -> float:
    """sacreBLEU of greedy (or beam `valid_beam`) translations of the validation sources."""
    import sacrebleu

    from aiayn.decoding.search import beam_search, greedy_search
    from aiayn.files.data import BatchIterator

    model.eval()
    count = len(corpus) if config.valid_max_sentences is None else min(len(corpus), config.valid_max_sentences)
    hypotheses: dict[int, str] = {}
    for batch in BatchIterator(corpus, min(config.batch_tokens, 8192), shuffle=False):
        rows = [r for r, index in enumerate(batch.indices) if index < count]
        if not rows:
            continue
        src = batch.src_tokens[rows].to(device)
        with autocast(device, config.precision):
            if config.valid_beam == 1:
                outputs = greedy_search(model, src)
            else:
                outputs = [hyps[0].tokens for hyps in beam_search(model, src, beam_size=config.valid_beam)]
        for row, tokens in zip(rows, outputs):
            hypotheses[batch.indices[row]] = tokenizer.decode(tokens)
    ordered = [hypotheses[i] for i in range(count)]
    return sacrebleu.corpus_bleu(ordered, [references[:count]]).score
