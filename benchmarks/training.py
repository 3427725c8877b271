"""Training throughput: target tokens per second of a full step (forward, backward, Adam step).

Systems, all with the same shape, batches, optimizer (Adam 0.9 / 0.98 / 1e-9) and loss
(aiayn's label-smoothed cross entropy, eps 0.1, padding ignored):
    aiayn         `TranslationLoss` (projects only the non-padding target positions to logits)
    nn.Transformer `torch.nn.Transformer` + tied embeddings, logits at every position
    HF Marian      `MarianMTModel` (sdpa attention), logits at every position
each in fp32 and / or bf16 (`torch.autocast`, weights and Adam state stay fp32).

Steps are run round-robin (step i of every system, then step i + 1), so a change in machine load
hits all systems alike. tokens/s = non-padding target tokens / wall time of the timed steps.

FLOPs of a step: `aiayn.training.compute.step_flops` (its docstring states the formula, so MFU can be checked).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from aiayn.allocator import retain_freed_memory
from aiayn.training.compute import batches_flops
from aiayn.config import ModelConfig
from aiayn.files.data import Batch
from aiayn.model.transformer import Transformer
from aiayn.training.train import TranslationLoss

from benchmarks.peers import TorchTransformer, full_logits_loss, marian_logits

LABEL_SMOOTHING = 0.1


@dataclass
class System:
    name: str
    model: torch.nn.Module
    loss: Callable[[Batch], torch.Tensor]
    precision: str
    optimizer: torch.optim.Optimizer | None = None
    seconds: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    steps: int = 0


def _build(name: str, config: ModelConfig, device: torch.device, seed: int) -> tuple[torch.nn.Module, Callable]:
    torch.manual_seed(seed)
    pad = config.pad_id
    if name == "aiayn":
        model = Transformer(config).to(device)
        criterion = TranslationLoss(model, label_smoothing=LABEL_SMOOTHING)
        return model, lambda b: criterion(b.src_tokens, b.tgt_input, b.tgt_output)[0]
    if name == "nn.Transformer":
        model = TorchTransformer(config).to(device)
        return model, lambda b: full_logits_loss(model(b.src_tokens, b.tgt_input), b.tgt_output, LABEL_SMOOTHING, pad)
    if name == "HF Marian":
        from benchmarks.peers import marian_from_aiayn

        model = marian_from_aiayn(Transformer(config)).to(device)
        return model, lambda b: full_logits_loss(
            marian_logits(model, b.src_tokens, b.tgt_input, pad), b.tgt_output, LABEL_SMOOTHING, pad
        )
    raise ValueError(f"unknown system {name!r}")


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(system: System, batch: Batch, device: torch.device) -> None:
    with autocast(device, system.precision):
        loss = system.loss(batch)
    loss.backward()
    system.optimizer.step()
    system.optimizer.zero_grad(set_to_none=True)


def measure(
    config: ModelConfig,
    batches: list[Batch],
    systems: list[tuple[str, str]],
    *,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Tokens/s of each (system name, precision) on `batches` (the first `warmup` untimed).

    Raises:
        ValueError: fewer batches than warmup + 1, or an unknown system.
    """
    if len(batches) <= warmup:
        raise ValueError(f"need more than warmup={warmup} batches, got {len(batches)}")
    built = []
    for name, precision in systems:
        model, loss = _build(name, config, device, seed)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        built.append(System(f"{name} {precision}", model, loss, precision, optimizer))
    batches = [batch.to(device) for batch in batches]
    for index, batch in enumerate(batches):
        for system in built:
            _sync(device)
            start = time.perf_counter()
            _step(system, batch, device)
            _sync(device)
            elapsed = time.perf_counter() - start
            if index >= warmup:
                system.seconds += elapsed
                system.tokens += batch.num_tgt_tokens
                system.flops += batches_flops(config, [batch])
                system.steps += 1
        log(f"  step {index + 1}/{len(batches)}: " + ", ".join(
            f"{s.name} {s.tokens / s.seconds:,.0f} tok/s" for s in built if s.seconds
        ))
    results = []
    for system in built:
        results.append({
            "system": system.name,
            "precision": system.precision,
            "parameters": sum(p.numel() for p in system.model.parameters()),
            "timed_steps": system.steps,
            "target_tokens": system.tokens,
            "seconds": round(system.seconds, 3),
            "tokens_per_s": round(system.tokens / system.seconds, 1),
            "gflops_per_s": round(system.flops / system.seconds / 1e9, 2),
        })
        del system.model, system.optimizer
    return results


def run(
    shapes: dict[str, dict],
    lengths,
    systems: list[tuple[str, str]],
    *,
    device: torch.device,
    peak_tflops: float | None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every shape in `shapes` ({preset: {"max_tokens", "steps", "warmup", "vocab_size"}}).

    All systems run in this one process with the allocator setting `aiayn.training.loop.fit` uses on the
    CPU (`retain_freed_memory`: glibc keeps freed memory, no page faults between steps).
    """
    from benchmarks.workload import training_batches

    out = {"lengths": lengths.origin, "loss": f"label-smoothed CE, eps {LABEL_SMOOTHING}", "shapes": {}}
    if device.type == "cpu":
        out["allocator"] = "glibc keeps freed memory" if retain_freed_memory() else "default"
    for preset, plan in shapes.items():
        config = ModelConfig.preset(preset, vocab_size=plan["vocab_size"])
        batches = training_batches(
            lengths, max_tokens=plan["max_tokens"], vocab_size=config.vocab_size, count=plan["warmup"] + plan["steps"]
        )
        log(f"training {preset}: {len(batches)} batches of <= {plan['max_tokens']} tokens")
        results = measure(config, batches, systems, warmup=plan["warmup"], device=device, log=log)
        for result in results:
            if peak_tflops and device.type == "cuda":
                result["mfu"] = round(result["gflops_per_s"] / (peak_tflops * 1e3), 4)
        out["shapes"][preset] = {
            "config": {k: getattr(config, k) for k in ("vocab_size", "d_model", "n_heads", "d_ff",
                                                         "n_encoder_layers", "n_decoder_layers", "dropout")},
            "max_tokens": plan["max_tokens"],
            "mean_target_tokens_per_batch": round(
                sum(b.num_tgt_tokens for b in batches[plan["warmup"]:]) / plan["steps"], 1
            ),
            "results": results,
        }
    return out
