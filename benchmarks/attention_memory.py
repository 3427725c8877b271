"""Peak memory and time of one multi-head attention layer, forward + backward, vs sequence length.

aiayn's `MultiHeadAttention` (batch 1, d_model 512, 8 heads, self-attention with the encoder's
all-True padding mask) on its two paths:
    reference  need_weights=True: softmax(Q K^T / sqrt(d)) V written out; the [B, H, L, L] scores
               and weights live until backward, so memory grows with L^2
    fast       need_weights=False: F.scaled_dot_product_attention (fused; no L x L tensor kept)

CPU: every point runs in a fresh subprocess (`python -m benchmarks.attention_memory --worker ...`)
and reports how far the process's resident set peaks above its size before one forward + backward
(measured after the layer, its input and a small warm-up call exist): simple, and what the
operating system really had to provide. On Linux the peak is /proc/self/status VmHWM, reset to the
current size first by writing 5 to /proc/self/clear_refs. Not `getrusage().ru_maxrss`: Linux carries
it across exec, so a child of a large benchmark process inherits its parent's peak and shows none.
CUDA: `torch.cuda.max_memory_allocated` over the same call, minus what was allocated
before. Time: the mean of `repeats` further calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

D_MODEL, N_HEADS = 512, 8


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the resident-set high-water mark to the current size; return that size in bytes."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):  # not Linux: fall back to ru_maxrss (fine in a fresh process)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None and os.path.exists("/proc/self/clear_refs"):
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _one_call(layer, x: torch.Tensor, mask: torch.Tensor, need_weights: bool) -> None:
    out, weights = layer(x, mask=mask, need_weights=need_weights)
    out.sum().backward()
    del out, weights


def worker(length: int, path: str, device: str, threads: int, repeats: int) -> dict:
    """Measure one (length, path) point in this process."""
    from aiayn.model.attention import MultiHeadAttention

    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    layer = MultiHeadAttention(d_model=D_MODEL, n_heads=N_HEADS).to(dev)
    need_weights = path == "reference"
    warm = torch.randn(1, 16, D_MODEL, device=dev, requires_grad=True)
    _one_call(layer, warm, torch.ones(1, 1, 1, 16, dtype=torch.bool, device=dev), need_weights)
    x = torch.randn(1, length, D_MODEL, device=dev, requires_grad=True)  # [B, L, E]
    mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device=dev)  # [B, 1, 1, L]
    layer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _one_call(layer, x, mask, need_weights)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _reset_peak_rss()
        _one_call(layer, x, mask, need_weights)
        peak = _peak_rss() - before
    start = time.perf_counter()
    for _ in range(repeats):
        x.grad = None
        _one_call(layer, x, mask, need_weights)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return {"length": length, "path": path, "peak_mib": round(peak / 2**20, 2), "ms": round(seconds * 1e3, 2)}


def run(lengths: list[int], *, device: str, threads: int, repeats: int, log=print) -> dict:
    """Every (length, path) point, each in a fresh subprocess; ratios reference / fast."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so `-m benchmarks...` resolves
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    rows = []
    for length in lengths:
        point = {"length": length, "attention_matrix_mib": round(N_HEADS * length * length * 4 / 2**20, 2)}
        for path in ("reference", "fast"):
            command = [sys.executable, "-m", "benchmarks.attention_memory", "--worker", "--length", str(length),
                       "--path", path, "--device", device, "--threads", str(threads), "--repeats", str(repeats)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                point[path] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
                continue
            point[path] = json.loads(done.stdout.strip().splitlines()[-1])
        ref, fast = point.get("reference", {}), point.get("fast", {})
        if "peak_mib" in ref and "peak_mib" in fast:
            if fast["peak_mib"] > 0:  # below the RSS page granularity at tiny lengths
                point["memory_ratio"] = round(ref["peak_mib"] / fast["peak_mib"], 2)
            point["time_ratio"] = round(ref["ms"] / fast["ms"], 2)
            log(f"attention L={length}: reference {ref['peak_mib']} MiB {ref['ms']} ms, "
                f"fast {fast['peak_mib']} MiB {fast['ms']} ms")
        rows.append(point)
    return {"d_model": D_MODEL, "heads": N_HEADS, "batch": 1, "device": device, "repeats": repeats,
            "memory_measure": "cuda max_memory_allocated" if device == "cuda"
            else "peak RSS (VmHWM) above the size before the call, fresh process",
            "points": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one attention memory point (used by benchmarks.run)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--path", choices=("reference", "fast"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.length, args.path, args.device, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
