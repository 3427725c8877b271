"""A full disk, for real: small tmpfs mounts (root only; skipped with the reason elsewhere).

Training that meets ENOSPC stops with one line naming the file, the space it needed and the space
free, keeps its newest complete checkpoint loadable, and resumes once there is space to the same
weights as a run that never stopped. translate --output, average and export leave nothing behind.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aiayn.cli import main
from aiayn.config import ModelConfig, TrainConfig
from aiayn.files.atomic import DiskFullError, atomic_write_bytes, write_output
from aiayn.files.checkpoint import checkpoint_paths, latest_checkpoint
from aiayn.files.data import encode_parallel
from aiayn.model.transformer import Transformer
from aiayn.training.loop import fit
from conftest import tiny_pairs

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """`make(bytes)` mounts a tmpfs of that size under tmp_path; `resize(where, bytes)` changes it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8): the disk-full tests run as root only")
    mounts = []

    def make(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


def fill(where: Path) -> None:
    """Take every free byte of the filesystem at `where`."""
    with open(where / "ballast", "wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * PAGE):
                pass
        except OSError:
            pass


def tree_bytes(path: Path) -> int:
    """Bytes a directory takes on a tmpfs: each file rounded up to whole pages."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in path.rglob("*") if f.is_file())


def _train(tokenizer, out: Path, resume: bool = False, **overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    corpus = encode_parallel(tokenizer, tiny_pairs(), 64)
    values = dict(batch_tokens=600, lr_scale=1.0, warmup_steps=4, max_steps=6, log_every=1, eval_every=0,
                  save_every=1, keep_last=10, seed=3, threads=1)
    return fit(model, tokenizer, corpus, TrainConfig(**{**values, **overrides}), out, resume=resume, progress=False)


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_one_line_and_resumes_exactly(small_disk, tiny_tokenizer, tmp_path):
    _train(tiny_tokenizer, tmp_path / "straight")
    steps = checkpoint_paths(tmp_path / "straight")
    one_checkpoint = tree_bytes(steps[0])
    start_files = tree_bytes(tmp_path / "straight") - len(steps) * one_checkpoint
    # Room for the run's own files and two checkpoints: the third does not fit.
    disk = small_disk(start_files + 2 * one_checkpoint + one_checkpoint // 2)
    with pytest.raises(DiskFullError) as caught:
        _train(tiny_tokenizer, disk / "run")
    message = str(caught.value)
    assert message.startswith(f"no space left on the device writing {disk / 'run'}")
    assert " MB, " in message and " MB free there" in message
    kept = checkpoint_paths(disk / "run")
    assert [p.name for p in kept] == ["step_00000001", "step_00000002"]
    assert message.endswith(f"the newest complete checkpoint is {kept[-1]}: --resume continues from it")
    assert not [p for p in (disk / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written one
    path, weights, state = latest_checkpoint(disk / "run", set_aside=False)
    assert path == kept[-1] and state["step"] == 2
    straight_step_2 = load_file(str(steps[1] / "model.safetensors"))
    assert all(torch.equal(weights[name], straight_step_2[name]) for name in straight_step_2)

    resize(disk, 64 * 2**20)
    _train(tiny_tokenizer, disk / "run", resume=True)
    resumed, straight = (load_file(str(d / "model.safetensors")) for d in (disk / "run", tmp_path / "straight"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_atomic_writes_on_a_full_disk_leave_the_old_file(small_disk):
    disk = small_disk(16 * PAGE)
    atomic_write_bytes(disk / "kept.txt", b"old")
    fill(disk)
    with pytest.raises(DiskFullError, match=rf"writing {disk / 'kept.txt'}: it needs about 0.1 MB, 0.0 MB free"):
        atomic_write_bytes(disk / "kept.txt", b"x" * 100_000)
    assert (disk / "kept.txt").read_bytes() == b"old"
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "kept.txt"]
    with pytest.raises(DiskFullError):
        write_output(disk / "new.txt", b"x" * 100_000)
    assert not (disk / "new.txt").exists()


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith(f"aiayn {command}: error: no space left on the device writing ")
    return err[-1]


def test_translate_output_on_a_full_disk_is_one_line(small_disk, tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in.de"
    source.write_text("Ein Hund läuft.\n" * 200, encoding="utf-8")
    disk = small_disk(16 * PAGE)
    fill(disk)
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(source), "--output",
                 str(disk / "out.en"), "--max-len-b", "3"]) == 2
    line = _one_error_line(capsys, "translate")
    assert str(disk / "out.en") in line and "MB free there" in line
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"]


def test_average_on_a_full_disk_is_one_line(small_disk, tiny_tokenizer, tmp_path, capsys):
    _train(tiny_tokenizer, tmp_path / "run", max_steps=2)
    disk = small_disk(16 * PAGE)
    fill(disk)
    assert main(["average", "--run", str(tmp_path / "run"), "--last", "2", "--out", str(disk / "avg")]) == 2
    assert str(disk / "avg") in _one_error_line(capsys, "average")
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"]


@pytest.mark.parametrize("target", ["ctranslate2", "marian"])
def test_export_on_a_full_disk_is_one_line(small_disk, tiny_model_dir, target, capsys):
    pytest.importorskip("ctranslate2" if target == "ctranslate2" else "transformers")
    disk = small_disk(16 * PAGE)
    fill(disk)
    assert main(["export", "--model", str(tiny_model_dir), "--to", target, "--out", str(disk / target)]) == 2
    assert str(disk / target) in _one_error_line(capsys, "export")
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"]
