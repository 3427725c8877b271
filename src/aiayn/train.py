"""Training (paper section 5): loss, train step, fit(). Optimizers and schedules: `aiayn.optim`;
the compute each step costs: `aiayn.compute`.

Shape legend: B batch, S source length, T target length, N non-padding target tokens, V vocab.

What a run writes (model directory, checkpoints, averaging) is `aiayn.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aiayn import hardware
from aiayn.allocator import retain_freed_memory
from aiayn.atomic import atomic_write_bytes
from aiayn.checkpoint import (
    _unwrap,
    checkpoint_paths,
    latest_checkpoint,
    prepare_run_directory,
    read_model_config,
    remove_leftovers,
    save_checkpoint,
    save_model,
)
from aiayn.compute import batches_flops
from aiayn.config import ModelConfig
from aiayn.model import Transformer
from aiayn.optim import BudgetEstimate, build_optimizer, learning_rate_for
from aiayn.tokenizer import Tokenizer

# --- loss (section 5.4) ------------------------------------------------------


def label_smoothed_nll_loss(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy against (1 - eps) * one_hot(target) + eps * uniform(V) (section 5.4).

    Args:
        logits: [N, V]; target: [N]; positions whose target is `ignore_index` contribute nothing.
    Returns:
        (smoothed loss summed over tokens, plain NLL summed over tokens), both float32 scalars.
    """
    lprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [N]
    smooth = -lprobs.mean(dim=-1)  # [N]: cross entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    if ignore_index is not None:
        keep = target != ignore_index
        loss, nll = loss[keep], nll[keep]
    return loss.sum(), nll.sum()


class TranslationLoss(torch.nn.Module):
    """Teacher-forced label-smoothed loss of a batch, as one module so DistributedDataParallel
    sees a single forward. Logits are computed only for non-padding target positions."""

    def __init__(self, model: Transformer, *, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, src_tokens: torch.Tensor, tgt_input: torch.Tensor, tgt_output: torch.Tensor):
        """[B, S], [B, T], [B, T] -> (smoothed loss sum, nll sum) over non-padding targets."""
        hidden = self.model.decode(tgt_input, self.model.encode(src_tokens), project=False).hidden  # [B, T, E]
        keep = tgt_output != self.model.config.pad_id  # [B, T]
        logits = self.model.logits(hidden[keep])  # [N, V]
        return label_smoothed_nll_loss(logits, tgt_output[keep], self.label_smoothing)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _distributed_context(device: str = "cpu", timeout_s: int = 300) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; starts the process group
    (NCCL between GPUs, gloo between CPU processes) with a `timeout_s` on every collective, so
    that a rank that hangs fails the others in minutes rather than PyTorch's default 30."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank


def _all_reduce(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sums over the processes. On `device`: NCCL (CUDA) runs collectives on GPU tensors only."""
    if world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _all_gather(state: torch.Tensor, world: int, device: torch.device) -> list[torch.Tensor]:
    """Every process's `state` (a CPU tensor of the same shape), rank order, on the CPU."""
    if world == 1:
        return [state]
    import torch.distributed as dist

    gathered = [torch.empty_like(state, device=device) for _ in range(world)]
    dist.all_gather(gathered, state.to(device))
    return [tensor.cpu() for tensor in gathered]


def _state_of_rank(states, rank: int) -> torch.Tensor:
    """A rank's random state from a checkpoint's per-rank list (rank 0's where the run had fewer
    processes, or where an older checkpoint kept one state for all)."""
    if isinstance(states, torch.Tensor):
        return states
    return states[rank] if rank < len(states) else states[0]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_timings(model: Transformer, batches: list, device: torch.device, precisions=("fp32", "bf16"), *,
                     label_smoothing: float = 0.1, repeats: int = 2) -> dict[str, float]:
    """Seconds per precision of a forward and backward pass over each of `batches` (`aiayn.data.Batch`),
    on a copy of `model` (left untouched, the caller's random state too): what `--precision auto`
    weighs for training. Pass batches like those the run will see: for a small model, whether bf16
    wins depends on their shapes (benchmarks/RESULTS.md)."""
    import copy

    probe = copy.deepcopy(_unwrap(model)).to(device).train()
    criterion = TranslationLoss(probe, label_smoothing=label_smoothing)
    batches = [batch.to(device) for batch in batches]

    def run(precision: str) -> None:
        for batch in batches:
            with _autocast(device, precision):
                loss, _ = criterion(batch.src_tokens, batch.tgt_input, batch.tgt_output)
            loss.backward()
            probe.zero_grad(set_to_none=True)

    runs = {precision: (lambda precision=precision: run(precision)) for precision in precisions}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for warm_up in runs.values():
            warm_up()
        return hardware.time_each(runs, repeats=repeats)


def train_step(
    criterion, optimizer, batches: list, *, lr: float, device: torch.device, precision: str, world: int = 1,
    clip_norm: float = 0.0, stop_requested: bool = False,
) -> tuple[float, float, float, bool]:
    """One update (section 5.3): teacher-forced forward and backward over this process's `batches`
    (gradients accumulated), then one Adam step at learning rate `lr`.

    The gradient is the per-token mean over the whole global batch (every process's batches).
    Returns:
        (smoothed loss sum, NLL sum, target tokens) over all processes, and whether any process
        asked to stop (a signal may reach one rank only: they agree through this all-reduce).
    Raises:
        TrainingDiverged: the loss is NaN / inf; the weights are left as they were.
    """
    global_tokens = _all_reduce([float(sum(b.num_tgt_tokens for b in batches))], world, device)[0]
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = nll_sum = 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        sync = world == 1 or i == len(batches) - 1
        with contextlib.nullcontext() if sync else criterion.no_sync():
            with _autocast(device, precision):
                loss, nll = criterion(batch.src_tokens, batch.tgt_input, batch.tgt_output)
            # DDP averages gradients over processes; scaling by world / global tokens makes the
            # update the per-token mean over the whole global batch.
            (loss * (world / global_tokens)).backward()
        loss_sum += loss.item()
        nll_sum += nll.item()
    loss_sum, nll_sum, stops = _all_reduce([loss_sum, nll_sum, float(stop_requested)], world, device)
    if not (math.isfinite(loss_sum) and math.isfinite(nll_sum)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss became {loss_sum / global_tokens}")
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(criterion.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, nll_sum, global_tokens, stops > 0


@dataclass
class TrainingState:
    """Where a run stands, besides weights, optimizer, data position and random state: what a
    checkpoint's state.pt adds to them, and what resume restores."""

    step: int = 0
    best_bleu: float = float("-inf")
    elapsed: float = 0.0  # seconds trained before this process started (earlier, resumed-from runs)
    # Written into every checkpoint, so that `aiayn average` can refuse to mix two runs.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    flops: float = 0.0  # training compute so far (aiayn.compute), every process's batches


def save_training_state(
    out_dir: Path, model, optimizer, iterator, state: TrainingState, *, elapsed: float, keep_last: int,
    world: int = 1, rank: int = 0, device: torch.device | None = None,
) -> None:
    """A checkpoint of the run (`aiayn.checkpoint.save_checkpoint`): weights, `state` (with
    `elapsed` seconds in all), optimizer, data position, and every rank's random states (CPU, and
    CUDA: each GPU has its own generator), so that a resumed run gives each rank its own back.
    Every rank calls it (the random states are gathered); rank 0 writes."""
    device = device or torch.device("cpu")
    rng = _all_gather(torch.get_rng_state(), world, device)
    cuda_rng = _all_gather(torch.cuda.get_rng_state(device), world, device) if device.type == "cuda" else None
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
    torch.set_rng_state(_state_of_rank(saved["rng"], rank))
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(_state_of_rank(saved["cuda_rng"], rank), device)
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
        import time

        return self.state.elapsed + time.monotonic() - self.started

    def epochs(self) -> float:
        return self.iterator.epoch - 1 + self.iterator.position / len(self.iterator)


class _RunLog:
    """log.jsonl (main process only), the progress bar and the lines printed above it."""

    def __init__(self, run: _Run, *, progress: bool) -> None:
        self.file = open(run.out_dir / "log.jsonl", "a", encoding="utf-8") if run.is_main else None  # noqa: SIM115
        self.bar = None
        if run.is_main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.config.max_steps, initial=run.state.step, unit="step", dynamic_ncols=True)

    def record(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

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
    """Train `model` on `train_corpus` (an `aiayn.data.TokenizedCorpus`) with `config` (TrainConfig).

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
    """
    run = _set_up(model, tokenizer, train_corpus, config, Path(out_dir), info or {}, valid_corpus, valid_references)
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


def _set_up(model, tokenizer, train_corpus, config, out_dir: Path, info, valid_corpus, valid_references) -> _Run:
    """Processes, device, threads, seeds; the loss module (DDP-wrapped), optimizer and batches."""
    import random

    import numpy as np

    from aiayn.data import BatchIterator

    rank, world, local_rank = _distributed_context(config.device, config.distributed_timeout_s)
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
    from aiayn.data import BatchIterator

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
    from aiayn.data import BatchIterator

    config = run.config
    per_update = config.accumulate * run.world
    epoch = list(BatchIterator(train_corpus, config.batch_tokens, shuffle=False))
    budget = BudgetEstimate(updates_per_epoch=len(epoch) / per_update,
                            flops_per_update=batches_flops(_unwrap(run.model).config, epoch) * per_update / len(epoch))
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
    import time

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
    import time

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

    from aiayn.data import BatchIterator

    model.eval()
    criterion = TranslationLoss(model, label_smoothing=config.label_smoothing)
    loss_sum = nll_sum = tokens = 0.0
    for batch in BatchIterator(corpus, config.batch_tokens, shuffle=False):
        batch = batch.to(device)
        with _autocast(device, config.precision):
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

    from aiayn.data import BatchIterator
    from aiayn.search import beam_search, greedy_search

    model.eval()
    count = len(corpus) if config.valid_max_sentences is None else min(len(corpus), config.valid_max_sentences)
    hypotheses: dict[int, str] = {}
    for batch in BatchIterator(corpus, min(config.batch_tokens, 8192), shuffle=False):
        rows = [r for r, index in enumerate(batch.indices) if index < count]
        if not rows:
            continue
        src = batch.src_tokens[rows].to(device)
        with _autocast(device, config.precision):
            if config.valid_beam == 1:
                outputs = greedy_search(model, src)
            else:
                outputs = [hyps[0].tokens for hyps in beam_search(model, src, beam_size=config.valid_beam)]
        for row, tokens in zip(rows, outputs):
            hypotheses[batch.indices[row]] = tokenizer.decode(tokens)
    ordered = [hypotheses[i] for i in range(count)]
    return sacrebleu.corpus_bleu(ordered, [references[:count]]).score


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


def train_from_args(args) -> dict[str, Any]:
    """`aiayn train`: resolve data, tokenizer, model and train config, then `fit`."""
    from aiayn.config import TrainConfig
    from aiayn.data import encode_parallel, multi30k_paths, parse_data_spec, read_parallel

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
    rank, world, _ = _distributed_context(train_config.device, train_config.distributed_timeout_s)
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
