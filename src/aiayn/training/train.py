"""Training, the paper's part (section 5): the label-smoothed loss, one update (train_step), and the
processes of data-parallel training it sums over. The loop around it is `aiayn.training.loop` (fit), the
recipes and the command line `aiayn.training.recipe`; optimizers and schedules `aiayn.training.optim`; the compute
each step costs `aiayn.training.compute`.

Shape legend: B batch, S source length, T target length, N non-padding target tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from aiayn import hardware
from aiayn.files.checkpoint import (
    _unwrap,
)
from aiayn.model.transformer import Transformer

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


def distributed_context(device: str = "cpu", timeout_s: int = 300) -> tuple[int, int, int]:
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


def all_reduce(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sums over the processes. On `device`: NCCL (CUDA) runs collectives on GPU tensors only."""
    if world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(state: torch.Tensor, world: int, device: torch.device) -> list[torch.Tensor]:
    """Every process's `state` (a CPU tensor of the same shape), rank order, on the CPU."""
    if world == 1:
        return [state]
    import torch.distributed as dist

    gathered = [torch.empty_like(state, device=device) for _ in range(world)]
    dist.all_gather(gathered, state.to(device))
    return [tensor.cpu() for tensor in gathered]


def state_of_rank(states, rank: int) -> torch.Tensor:
    """A rank's random state from a checkpoint's per-rank list (rank 0's where the run had fewer
    processes, or where an older checkpoint kept one state for all)."""
    if isinstance(states, torch.Tensor):
        return states
    return states[rank] if rank < len(states) else states[0]


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_timings(model: Transformer, batches: list, device: torch.device, precisions=("fp32", "bf16"), *,
                     label_smoothing: float = 0.1, repeats: int = 2) -> dict[str, float]:
    """Seconds per precision of a forward and backward pass over each of `batches` (`aiayn.files.data.Batch`),
    on a copy of `model` (left untouched, the caller's random state too): what `--precision auto`
    weighs for training. Pass batches like those the run will see: for a small model, whether bf16
    wins depends on their shapes (benchmarks/RESULTS.md)."""
    import copy

    probe = copy.deepcopy(_unwrap(model)).to(device).train()
    criterion = TranslationLoss(probe, label_smoothing=label_smoothing)
    batches = [batch.to(device) for batch in batches]

    def run(precision: str) -> None:
        for batch in batches:
            with autocast(device, precision):
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
    global_tokens = all_reduce([float(sum(b.num_tgt_tokens for b in batches))], world, device)[0]
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = nll_sum = 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        sync = world == 1 or i == len(batches) - 1
        with contextlib.nullcontext() if sync else criterion.no_sync():
            with autocast(device, precision):
                loss, nll = criterion(batch.src_tokens, batch.tgt_input, batch.tgt_output)
            # DDP averages gradients over processes; scaling by world / global tokens makes the
            # update the per-token mean over the whole global batch.
            (loss * (world / global_tokens)).backward()
        loss_sum += loss.item()
        nll_sum += nll.item()
    loss_sum, nll_sum, stops = all_reduce([loss_sum, nll_sum, float(stop_requested)], world, device)
    if not (math.isfinite(loss_sum) and math.isfinite(nll_sum)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss became {loss_sum / global_tokens}")
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(criterion.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, nll_sum, global_tokens, stops > 0
