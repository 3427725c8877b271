"""How the weights move: the optimizer (paper section 5.3: Adam) and the learning-rate schedule.

Schedules (`TrainConfig.schedule`):
    inverse_sqrt  the paper's equation 3: linear warmup for `warmup_steps` updates, then the
                  inverse square root of the step. Knows nothing of the budget; the paper's default.
    constant      warmup, then the peak learning rate until the budget ends.
    linear        warmup, then linear decay to zero at the end of the budget (Li et al., ICLR 2020,
                  "Budget-aware training": the budget's end is where the rate should reach zero).
    cosine        warmup, then half a cosine to zero at the end of the budget (Loshchilov & Hutter 2017).
    wsd           warmup-stable-decay: warmup, the peak until the last `decay_fraction` of the budget,
                  then linear decay to zero (Hu et al. 2024, MiniCPM).
The budgeted schedules (all but inverse_sqrt) warm up over the first `warmup_fraction` of the
budget's updates and need to know how many updates the budget holds. `BudgetEstimate` says so:
exactly for a budget in updates, epochs or TFLOP (the FLOPs of every batch are known before it
runs), and from the measured seconds per update for a budget in minutes, re-estimated as the run
goes, so that the schedule fits the updates this machine really makes.

Optimizers (`TrainConfig.optimizer`): adam (the paper's, betas 0.9 / 0.98, eps 1e-9), adamw
(decoupled weight decay, Loshchilov & Hutter 2019), sgd (with momentum) and muon (Jordan et al.
2024: the momentum of each 2-D weight matrix of the stacks orthogonalised by Newton-Schulz
iterations; embeddings, biases and LayerNorms keep Adam, as in the NanoGPT speedrun. Its rate is
matched to AdamW's update RMS, Liu et al. 2025, so one learning rate serves both). `Muon` here is
torch.optim.Muon's algorithm with one change: the Newton-Schulz iterations run in bf16 only where
bf16 matrix products are native; torch.optim.Muon always casts to bf16, which on an AVX2-only CPU
takes PyTorch's reference path and made each update several times slower than its forward and
backward passes together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aiayn import hardware
from aiayn.config import OPTIMIZERS, SCHEDULES

# The weight matrices Muon orthogonalises: attention in / out projections and the two FFN layers.
MUON_WEIGHTS = ("in_proj.weight", "out_proj.weight", "linear1.weight", "linear2.weight")


def inverse_sqrt_rate(step: int, *, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (equation 3).

    Rises linearly for `warmup_steps` updates, then decays with the inverse square root of the
    step. `step` counts updates from 1.
    """
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def budgeted_rate(step: int, total: float, *, schedule: str, peak: float, warmup_fraction: float,
                  decay_fraction: float = 0.2) -> float:
    """The learning rate of update `step` (from 1) of a budget of `total` updates.

    Warmup is linear over the first max(1, warmup_fraction * total) updates; the decay is a function
    of the fraction of the budget done before this update, p = (step - 1) / total, and reaches zero
    at p = 1. Raises ValueError for an unknown schedule.
    """
    if schedule not in SCHEDULES or schedule == "inverse_sqrt":
        raise ValueError(f"budgeted_rate: schedule must be one of {SCHEDULES[1:]}, got {schedule!r}")
    total = max(float(total), 1.0)
    warmup = min(1.0, step / max(1.0, warmup_fraction * total))
    done = min(max((step - 1) / total, 0.0), 1.0)
    if schedule == "constant":
        decay = 1.0
    elif schedule == "linear":
        decay = 1.0 - done
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * done))
    else:  # wsd
        decay = min(1.0, (1.0 - done) / decay_fraction) if decay_fraction > 0 else 1.0
    return peak * warmup * decay


def peak_rate(config, d_model: int) -> float:
    """The budgeted schedules' peak: `config.peak_lr`, or the paper's peak for lr_scale / warmup_steps."""
    if config.peak_lr is not None:
        return config.peak_lr
    return inverse_sqrt_rate(config.warmup_steps, d_model=d_model, warmup_steps=config.warmup_steps,
                             scale=config.lr_scale)


@dataclass
class BudgetEstimate:
    """How many updates a run's budget holds, estimated from what each unit of it costs.

    Each budget the config sets (max_steps, max_epochs, max_tflop, max_minutes) gives an estimate
    of the total updates; the smallest is the one that ends the run.
    Args:
        updates_per_epoch: updates in one pass over the training data.
        flops_per_update: mean FLOPs of an update over an epoch (`aiayn.training.compute`).
        seconds_per_update: measured (or probed) wall time of an update; updated by the caller.
    """

    updates_per_epoch: float
    flops_per_update: float
    seconds_per_update: float | None = None

    def total_updates(self, config, *, step: int, epochs: float, flops: float, seconds: float) -> float:
        """The estimated number of updates of the whole run, `step` of them done (epochs, FLOPs and
        seconds spent so far given); infinite when the config sets no budget."""
        estimates = []
        if config.max_steps is not None:
            estimates.append(float(config.max_steps))
        if config.max_epochs is not None:
            estimates.append(step + max(config.max_epochs - epochs, 0.0) * self.updates_per_epoch)
        if config.max_tflop is not None:
            estimates.append(step + max(config.max_tflop * 1e12 - flops, 0.0) / max(self.flops_per_update, 1.0))
        if config.max_minutes is not None and self.seconds_per_update:
            estimates.append(step + max(config.max_minutes * 60 - seconds, 0.0) / self.seconds_per_update)
        return min(estimates) if estimates else math.inf


def learning_rate_for(config, *, d_model: int, step: int, total_updates: float) -> float:
    """The learning rate of update `step` under `config.schedule` (`total_updates`: the budget's)."""
    if config.schedule == "inverse_sqrt":
        return inverse_sqrt_rate(step, d_model=d_model, warmup_steps=config.warmup_steps, scale=config.lr_scale)
    return budgeted_rate(step, total_updates, schedule=config.schedule, peak=peak_rate(config, d_model),
                         warmup_fraction=config.warmup_fraction, decay_fraction=config.decay_fraction)


# The quintic Newton-Schulz coefficients of Jordan et al. (maximal slope at zero; torch.optim.Muon's).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, *, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for the SVD U S V^T of the 2-D `update`: `steps` quintic
    Newton-Schulz iterations X <- aX + (bXX^T + c(XX^T)^2)X, computed in `dtype`, on the matrix
    scaled to spectral norm <= 1 (its Frobenius norm bounds the spectral one). The singular values
    come out in about [0.7, 1.2], not exactly 1, which Jordan et al. found does not hurt."""
    a, b, c = NEWTON_SCHULZ
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller side squared
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices: Nesterov momentum, orthogonalised (`orthogonalize`), applied with
    the rate scaled by 0.2 * sqrt(max(rows, cols)) to match AdamW's update RMS (Liu et al. 2025),
    and decoupled weight decay. `ns_dtype` is the Newton-Schulz precision, not saved with the state,
    so that a run resumed on another machine uses its own."""

    def __init__(self, params, *, lr: float = 0.0, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"Muon: ns_steps must be in 1..99, got {ns_steps}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: takes 2-D weight matrices, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, steps=group["ns_steps"], dtype=self.ns_dtype, eps=group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matrix products are native on `device` (AMX, AVX512-BF16, a bf16 GPU), else fp32."""
    return torch.bfloat16 if hardware.detect().native_bf16(device) else torch.float32


class OptimizerGroup:
    """Several optimizers stepped as one (Muon for the weight matrices, Adam for the rest): the
    param_groups, step, zero_grad and state_dict that the training step uses."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this run's optimizer (muon + adam)")
        for optimizer, optimizer_state in zip(self.optimizers, saved):
            optimizer.load_state_dict(optimizer_state)


def build_optimizer(model: torch.nn.Module, config):
    """The optimizer `config.optimizer` names over `model`'s parameters, learning rate 0 (the
    training step sets it every update). Raises ValueError for an unknown name."""
    betas, eps, decay = (config.adam_beta1, config.adam_beta2), config.adam_eps, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.0, betas=betas, eps=eps, weight_decay=decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.0, betas=betas, eps=eps, weight_decay=decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=config.sgd_momentum, nesterov=True,
                               weight_decay=decay)
    if config.optimizer == "muon":
        matrices = [p for name, p in model.named_parameters() if name.endswith(MUON_WEIGHTS) and p.ndim == 2]
        chosen = {id(p) for p in matrices}
        others = [p for p in model.parameters() if id(p) not in chosen]
        return OptimizerGroup([
            Muon(matrices, lr=0.0, weight_decay=decay, ns_dtype=newton_schulz_dtype(matrices[0].device)),
            torch.optim.AdamW(others, lr=0.0, betas=betas, eps=eps, weight_decay=decay),
        ])
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
