"""The command line's failure cases, as a clumsy or hostile user meets them.

Runs `python -m aiayn ...` in a temporary directory for each case and prints a table: exit
status, the first line of stderr (or "traceback: <its last line>"), and a check of what must
not be lost (an earlier model still loads, no work done before an error, ...). Point --src at
another checkout's `src/` to see its behaviour (how the "before" column was made):

    python benchmarks/failure_cases.py                      # this checkout
    python benchmarks/failure_cases.py --src /tmp/before/src --markdown
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MULTI30K = Path(os.environ.get("AIAYN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")
MEMORY_LIMIT = 6 << 30  # the hostile model directories must hit a limit, not the machine


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class Probe:
    def __init__(self, src: Path, work: Path) -> None:
        self.src, self.work = src, work
        self.env = {**os.environ, "PYTHONPATH": str(src), "AIAYN_DEBUG": "", "PYTHONWARNINGS": "ignore"}
        self.env.pop("AIAYN_DEBUG")

    def aiayn(self, *args: str, stdin: bytes | None = b"", close_stdin: bool = False,
              timeout: float = 120) -> tuple[int | str, str, float]:
        """(exit status, the stderr line that matters, seconds)."""
        start = time.monotonic()
        command = [sys.executable, "-m", "aiayn", *args]
        if close_stdin:  # fd 0 closed, as `aiayn translate <&-` does
            command = ["bash", "-c", 'exec "$@" <&-', "bash", *command]
        try:
            process = subprocess.run(
                command, input=None if close_stdin else stdin, capture_output=True, env=self.env, cwd=self.work,
                timeout=timeout, preexec_fn=_limit_memory,
            )
        except subprocess.TimeoutExpired:
            self.last_stdout = ""
            return "-", f"still running after {timeout:g} s (killed)", time.monotonic() - start
        self.last_stdout = process.stdout.decode(errors="replace")
        lines = [line for line in process.stderr.decode(errors="replace").splitlines() if line.strip()]
        # The line that says which precision ran, and warnings, are not what a case is about.
        lines = [line for line in lines if not re.match(r"aiayn \w+: (precision |warning: )", line)]
        if any(line.startswith("Traceback") for line in lines):
            shown = "traceback: " + lines[-1]
        else:
            shown = lines[0] if lines else "(nothing else on stderr)"
        return process.returncode, shown[:150], time.monotonic() - start

    def train(self, out: Path, *extra: str, steps: int = 4) -> tuple[int, str, float]:
        return self.aiayn(
            "train", "--train-src", str(self.work / "train.de"), "--train-tgt", str(self.work / "train.en"),
            "--out", str(out), "--preset", "tiny", "--vocab-size", "200", "--max-steps", str(steps),
            "--batch-tokens", "600", "--precision", "fp32", "--set", "save_every=1", "--set", "eval_every=0",
            "--set", "log_every=1", "--no-progress", *extra,
        )


def _weights_digest(directory: Path) -> str:
    import hashlib

    path = directory / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"


def cases(p: Probe) -> list[tuple[str, Callable[[], tuple[int, str, str]]]]:
    work = p.work
    model = work / "model"  # a trained model every case may copy

    def copy_model(name: str) -> Path:
        target = work / name
        shutil.copytree(model, target)
        return target

    def translate(directory: Path, *extra: str, stdin: bytes = "Ein Hund .\n".encode(), **kw):
        return p.aiayn("translate", "--model", str(directory), "--precision", "fp32", *extra, stdin=stdin, **kw)

    def loads(directory: Path) -> str:
        status, line, _ = translate(directory)
        return "model still loads" if status == 0 else f"model broken: {line}"

    def fresh_train_over_model():
        run = copy_model("over")
        before = _weights_digest(run)
        status, line, _ = p.train(run, steps=1)
        kept = "best model kept" if _weights_digest(run) == before else "best model replaced by a 1-step one"
        return status, line, kept

    def typo_over_model():
        run = copy_model("typo")
        status, line, _ = p.train(run, "--model", "foo=1", "--vocab-size", "150")
        return status, line, loads(run)

    def average(last: str):
        def case():
            status, line, _ = p.aiayn("average", "--run", str(model), "--last", last, "--out", str(work / f"avg{last}"))
            info = work / f"avg{last}" / "config.json"
            used = json.loads(info.read_text())["info"].get("averaged") if info.is_file() else None
            return status, line, f"averaged {used}" if used else "nothing written"
        return case

    def bad_weights(name: str, content: Callable[[bytes], bytes]):
        def case():
            directory = copy_model(name)
            path = directory / "model.safetensors"
            path.write_bytes(content(path.read_bytes()))
            status, line, _ = translate(directory)
            return status, line, ""
        return case

    def bad_config(name: str, edit: Callable[[dict], object]):
        def case():
            directory = copy_model(name)
            path = directory / "config.json"
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
            status, line, _ = translate(directory)
            return status, line, ""
        return case

    def recipe(name: str, text: str, *extra: str):
        def case():
            path = work / f"{name}.yaml"
            path.write_text(text)
            status, line, _ = p.train(work / name, "--config", str(path), *extra)
            return status, line, ""
        return case

    def train_with(name: str, *extra: str):
        def case():
            status, line, _ = p.train(work / name, *extra)
            return status, line, ""
        return case

    def nan_weights():
        import torch
        from safetensors.torch import load_file, save_file

        directory = copy_model("nan")
        weights = load_file(str(directory / "model.safetensors"))
        name = sorted(weights)[0]
        weights[name] = torch.full_like(weights[name], float("nan"))
        save_file(weights, str(directory / "model.safetensors"), metadata={"format_version": "1"})
        status, line, _ = translate(directory)
        return status, line, ""

    def huge_config():
        return bad_config("huge", lambda c: {**c, "model": {**c["model"], "d_model": 10**9, "n_heads": 1}})()

    def gzip_bomb():
        # 6 MB of gzip that expands to 1.5 GB without a newline
        bomb = work / "bomb.de.gz"
        with gzip.open(bomb, "wb", compresslevel=9) as handle:
            chunk = b"a" * (1 << 20)
            for _ in range(1500):
                handle.write(chunk)
        shutil.copy(bomb, work / "bomb.en.gz")
        status, line, _ = p.aiayn("train", "--train-src", str(bomb), "--train-tgt", str(work / "bomb.en.gz"),
                                  "--out", str(work / "bombrun"), "--preset", "tiny", "--max-steps", "1")
        return status, line, f"{bomb.stat().st_size / 1e6:.1f} MB gzip"

    def missing_output_dir():
        lines = "\n".join(["Ein Mann fährt Fahrrad ."] * 300).encode()
        status, line, seconds = translate(model, "--output", str(work / "no" / "such" / "dir" / "out.txt"),
                                          "--beam", "4", stdin=lines)
        return status, line, f"{seconds:.1f} s spent before the error"

    def port_in_use():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            status, line, _ = p.aiayn("serve", "--model", str(model), "--port", str(port), "--precision", "fp32",
                                      timeout=60)
        return status, line, ""

    def resume_after_empty_checkpoint():
        run = work / "powerloss"
        shutil.copytree(model, run)
        newest = sorted((run / "checkpoints").iterdir())[-1]
        (newest / "model.safetensors").write_bytes(b"")
        (run / "checkpoints" / ".tmp_killed").mkdir()
        status, line, _ = p.train(run, "--resume", "--max-steps", "6")
        leftovers = [q.name for q in (run / "checkpoints").iterdir() if q.name.startswith(".tmp_")]
        return status, line, f"leftover temporary directories: {leftovers or 'none'}"

    def log_after_resume():
        run = work / "relog"
        shutil.copytree(model, run)
        checkpoints = sorted((run / "checkpoints").iterdir())
        for stale in checkpoints[-2:]:  # killed after step 4 was logged but before it was saved
            shutil.rmtree(stale)
        status, line, _ = p.train(run, "--resume", "--max-steps", "5")
        steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines() if '"loss"' in x]
        return status, line, f"logged steps {steps}"

    def file_modes():
        old = os.umask(0o022)
        try:
            run = work / "modes"
            status, line, _ = p.train(run, steps=1)
        finally:
            os.umask(old)
        modes = sorted({oct((run / name).stat().st_mode & 0o777) for name in
                        ("model.safetensors", "config.json", "tokenizer.model")})
        return status, line, f"umask 022 gives modes {modes}"

    def small_disk(name: str, size: int) -> Path | None:
        """A tmpfs of `size` bytes at work/name (root only; None where it cannot be mounted)."""
        where = work / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode != 0:
            return None
        return where

    def full_disk(name: str) -> Path | None:
        where = small_disk(name, 64 << 10)
        if where is not None:
            with open(where / "ballast", "wb", buffering=0) as handle:
                try:
                    while handle.write(b"\0" * 4096):
                        pass
                except OSError:
                    pass
        return where

    def tree_bytes(path: Path) -> int:
        return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())

    def train_onto_a_full_disk():
        checkpoints = sorted((model / "checkpoints").iterdir())
        one = tree_bytes(checkpoints[0])
        disk = small_disk("disk-train", tree_bytes(model) - len(checkpoints) * one + 2 * one + one // 2)
        if disk is None:
            return "-", "skipped: mounting a tmpfs needs root", ""
        status, line, _ = p.train(disk / "run", "--set", "keep_last=10", steps=8)
        kept = sorted(q.name for q in (disk / "run" / "checkpoints").iterdir()) if (disk / "run").is_dir() else []
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed, resumed_line, _ = p.train(disk / "run", "--resume", "--set", "keep_last=10", steps=8)
        return status, line, f"kept {kept}; after space was freed, --resume exit {resumed} {resumed_line[:60]}"

    def onto_full_disk(command: str):
        def case():
            disk = full_disk(f"disk-{command}")
            if disk is None:
                return "-", "skipped: mounting a tmpfs needs root", ""
            if command == "translate":
                status, line, _ = translate(model, "--output", str(disk / "out.en"),
                                            stdin="Ein Hund läuft über die Wiese .\n".encode() * 2000)
            elif command == "average":
                status, line, _ = p.aiayn("average", "--run", str(model), "--last", "2", "--out", str(disk / "avg"))
            else:
                status, line, _ = p.aiayn("export", "--model", str(model), "--to", "ctranslate2",
                                          "--out", str(disk / "ct2"))
            left = sorted(q.name for q in disk.iterdir() if q.name != "ballast")
            return status, line, f"left on the disk: {left or 'nothing'}"
        return case

    def train_batch_too_large():
        # All 400 pairs in one batch through a 64k-wide feed-forward layer (the largest config.json
        # allows): about 1.5 GB per saved activation, past the probe's 6 GiB address-space limit.
        status, line, seconds = p.train(work / "toolarge", "--model", "d_ff=65536", "--batch-tokens", "100000",
                                        steps=1)
        return status, line, f"{seconds:.1f} s"

    def translate_batch_too_large():
        lines = "Ein Hund läuft über die Wiese und ein Kind spielt im Garten .\n".encode() * 4000
        status, line, seconds = translate(model, "--beam", "128", "--batch-tokens", "1000000", "--output",
                                          str(work / "toolarge.en"), stdin=lines, timeout=600)
        left = "no output file" if not (work / "toolarge.en").exists() else "an output file"
        return status, line, f"{left}; {seconds:.1f} s"

    return [
        ("train onto a full disk", train_onto_a_full_disk),
        ("translate --output onto a full disk", onto_full_disk("translate")),
        ("average onto a full disk", onto_full_disk("average")),
        ("export onto a full disk", onto_full_disk("export")),
        ("train: a batch beyond the address space", train_batch_too_large),
        ("translate: a batch beyond the address space", translate_batch_too_large),
        ("train --out DIR holding a model (no --resume)", fresh_train_over_model),
        ("train --model foo=1 over an existing model", typo_over_model),
        ("average --last 0", average("0")),
        ("average --last -2", average("-2")),
        ("model.safetensors truncated", bad_weights("trunc", lambda b: b[: len(b) // 2])),
        ("model.safetensors empty", bad_weights("empty", lambda b: b"")),
        ("model.safetensors not safetensors", bad_weights("junk", lambda b: b"PK\x03\x04 not weights" * 10)),
        ("train --model dropout=abc", train_with("dropabc", "--model", "dropout=abc")),
        ("recipe is a YAML list", recipe("list", "- a\n- b\n")),
        ("recipe is a scalar", recipe("scalar", "42\n")),
        ("recipe with unknown model: key", recipe("unknownkey", "model:\n  foo: 1\n")),
        ("--set with invalid YAML", train_with("badyaml", "--set", "warmup_steps=[1")),
        ("config.json is a list", bad_config("cfglist", lambda c: [c])),
        ("config.json lacks model", bad_config("cfgnomodel", lambda c: {k: v for k, v in c.items() if k != "model"})),
        ("config.json d_model = 10^9", huge_config),
        ("invalid UTF-8 on stdin", lambda: (*translate(model, stdin=b"Ein \xff Hund\n")[:2], "")),
        ("BOM on stdin", lambda: _bom(p, translate, model)),
        ("stdin closed", lambda: (*translate(model, close_stdin=True)[:2], "")),
        ("--device cuda without CUDA", lambda: (*translate(model, "--device", "cuda")[:2], "")),
        ("--beam 100000", lambda: (*translate(model, "--beam", "100000")[:2], "")),
        ("serve on a port in use", port_in_use),
        ("NaN weights", nan_weights),
        ("gzip bomb as training data", gzip_bomb),
        ("translate --output into a missing directory", missing_output_dir),
        ("--resume after an empty newest checkpoint", resume_after_empty_checkpoint),
        ("log.jsonl after a resume", log_after_resume),
        ("file modes of a model directory", file_modes),
    ]


def _bom(probe: Probe, translate, model: Path) -> tuple[int, str, str]:
    translate(model, stdin="Ein Hund .\n".encode())
    plain = probe.last_stdout
    status, line, _ = translate(model, stdin="\ufeffEin Hund .\n".encode())
    same = "same translation as without the BOM" if probe.last_stdout == plain else "translation differs"
    return status, line, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--only", help="run the cases whose name holds this text")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    from aiayn.files.data import read_lines

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.de").write_text("\n".join(read_lines(MULTI30K / "val.de.gz")[:400]) + "\n")
        (work / "train.en").write_text("\n".join(read_lines(MULTI30K / "val.en.gz")[:400]) + "\n")
        probe = Probe(Path(args.src), work)
        status, line, _ = probe.train(work / "model", steps=4)
        if status != 0:
            raise SystemExit(f"could not train the probe model: {line}")
        rows = []
        try:
            for name, case in cases(probe):
                if args.only and args.only not in name:
                    continue
                status, line, check = case()
                rows.append((name, status, line, check))
                print(f"{name:48s} {status:>4}  {line}  {check}", file=sys.stderr if args.markdown else sys.stdout,
                      flush=True)
        finally:  # the small disks of the machine-fault cases
            for mount in Path("/proc/mounts").read_text().splitlines():
                if mount.split()[1].startswith(str(work)):
                    subprocess.run(["umount", "-l", mount.split()[1]], capture_output=True)
    if args.markdown:
        print("| case | exit | stderr (first line) | check |\n|---|---|---|---|")
        for name, status, line, check in rows:
            print(f"| {name} | {status} | `{line.replace('|', '/')}` | {check} |")


if __name__ == "__main__":
    main()
