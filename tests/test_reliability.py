"""Failure cases a clumsy or hostile user finds: nothing lost, one clear line, no
unbounded allocation. Each test failed before its fix. The server's cases are in test_server.py."""

import gzip
import io
import json
import math
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aiayn import ModelConfig, Transformer
from aiayn.files.checkpoint import (
    average_run,
    checkpoint_paths,
    latest_checkpoint,
    load_model,
    prepare_run_directory,
    save_checkpoint,
    save_model,
)
from aiayn.cli import main
from aiayn.config import MAX_BEAM_SIZE, DecodeConfig, TrainConfig
from aiayn.files.data import DataError, read_lines
from aiayn.files.tokenizer import Tokenizer
from aiayn.decoding.translator import Translator
from conftest import tiny_pairs

SENTENCES = ["Ein Hund läuft .", "Zwei Männer spielen Fußball .", "Eine Frau liest ."] * 20


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    text = tiny_pairs()
    root = tmp_path_factory.mktemp("text")
    (root / "train.de").write_text("\n".join(text.src[:300]) + "\n", encoding="utf-8")
    (root / "train.en").write_text("\n".join(text.tgt[:300]) + "\n", encoding="utf-8")
    return root


def _train(text_files: Path, out: Path, *extra: str, steps: int = 3) -> int:
    return main([
        "train", "--train-src", str(text_files / "train.de"), "--train-tgt", str(text_files / "train.en"),
        "--out", str(out), "--preset", "tiny", "--vocab-size", "200", "--max-steps", str(steps),
        "--batch-tokens", "600", "--precision", "fp32", "--set", "save_every=1", "--set", "eval_every=0",
        "--set", "log_every=1", "--threads", "1", "--no-progress", *extra,
    ])


@pytest.fixture(scope="module")
def run_dir(text_files, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert _train(text_files, out) == 0
    return out


def _copy(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


def _digest(path: Path) -> bytes:
    return path.read_bytes()


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and ": precision " not in line and "warning:" not in line]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# --- configurations: types, bounds ------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"dropout": "abc"}, "dropout must be a number in [0.0, 1.0), got 'abc'"),
    ({"d_model": 10**9, "n_heads": 1}, "d_model must be an int in [1, 16384], got 1000000000"),
    ({"vocab_size": True}, "vocab_size must be an int"),
    ({"n_encoder_layers": 2.5}, "n_encoder_layers must be an int"),
    ({"norm_first": "yes"}, "norm_first must be true or false"),
    ({"foo": 1}, "unknown ModelConfig fields ['foo']"),
])
def test_model_config_rejects_wrong_types_and_huge_values(overrides, message):
    with pytest.raises(ValueError) as error:
        ModelConfig.preset("tiny", **overrides)
    assert message in str(error.value)


def test_train_and_decode_configs_reject_non_finite_and_unbounded_values():
    for field in ("lr_scale", "adam_eps", "clip_norm", "label_smoothing", "max_minutes"):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: math.nan})
    with pytest.raises(ValueError, match="seed must be an int"):
        TrainConfig(seed="1")
    for value in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="length_penalty"):
            DecodeConfig(length_penalty=value)
    with pytest.raises(ValueError, match=f"beam_size must be an int in \\[1, {MAX_BEAM_SIZE}\\]"):
        DecodeConfig(beam_size=MAX_BEAM_SIZE + 1)
    with pytest.raises(ValueError, match="expects a mapping"):
        TrainConfig.from_dict([1, 2])


# --- model directories from anyone ------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "not a readable safetensors file"),
    (lambda b: b"", "not a readable safetensors file"),
    (lambda b: b"PK\x03\x04 not weights" * 10, "not a readable safetensors file"),
])
def test_damaged_weights_are_one_clear_error(run_dir, tmp_path, capsys, damage, message):
    directory = _copy(run_dir, tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        load_model(directory)
    assert str(path) in str(error.value)
    assert main(["translate", "--model", str(directory), "--input", str(path)]) == 2
    assert str(path) in _one_error_line(capsys)


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "expected a JSON object"),
    (lambda c: {k: v for k, v in c.items() if k != "model"}, "'model' must be an object"),
    (lambda c: {**c, "model": {**c["model"], "dropout": "abc"}}, "dropout must be a number"),
    (lambda c: {**c, "info": 3}, "'info' must be an object"),
])
def test_bad_config_json_names_the_file(run_dir, tmp_path, edit, message):
    directory = _copy(run_dir, tmp_path)
    path = directory / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message) as error:
        load_model(directory)
    assert str(path) in str(error.value)


def test_a_huge_config_is_refused_before_any_allocation(run_dir, tmp_path, monkeypatch):
    directory = _copy(run_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    # Inside the bounds, but not what the weights hold: refused from the header, nothing built.
    config["model"].update(d_model=8192, d_ff=65536, n_heads=8)
    (directory / "config.json").write_text(json.dumps(config))
    built = []  # the device each Transformer was built on: only "meta" (no memory) is allowed

    def recording(config):
        built.append(torch.empty(0).device.type)
        return Transformer(config)

    monkeypatch.setattr("aiayn.files.checkpoint.Transformer", recording)
    with pytest.raises(ValueError, match=r"has shape \[200, 32\] but config.json implies \[200, 8192\]"):
        load_model(directory)
    assert built == ["meta"]
    config["model"]["d_model"] = 10**9
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="d_model must be an int in"):
        load_model(directory)


def test_non_finite_weights_are_refused_at_load_and_by_the_translator(run_dir, tmp_path, capsys):
    directory = _copy(run_dir, tmp_path)
    weights = load_file(str(directory / "model.safetensors"))
    weights["src_embedding.weight"][3, 0] = math.nan
    save_file(weights, str(directory / "model.safetensors"), metadata={"format_version": "1"})
    with pytest.raises(ValueError, match="src_embedding.weight holds 1 NaN or infinite values"):
        load_model(directory)
    assert main(["translate", "--model", str(directory)]) == 2
    assert "NaN or infinite" in _one_error_line(capsys)
    model, tokenizer, _ = load_model(run_dir)
    with torch.no_grad():
        model.src_embedding.weight[3, 0] = math.inf
    with pytest.raises(ValueError, match="src_embedding.weight holds NaN or infinite values"):
        Translator(model, tokenizer)


def test_untrained_model_text_with_a_lone_surrogate_is_a_value_error(run_dir):
    translator = Translator.load(run_dir)
    with pytest.raises(ValueError, match="line 2: not valid Unicode text"):
        translator.translate(["Ein Hund .", "x\udcff"])


# --- input files and stdin --------------------------------------------------------------------


def test_an_overlong_line_and_a_gzip_bomb_stop_with_the_line_number(tmp_path, monkeypatch):
    monkeypatch.setattr("aiayn.files.data.MAX_LINE_BYTES", 1000)
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb") as handle:
        handle.write(b"ok\n" + b"a" * 10**7)  # 10 MB of one line from a few kB
    assert bomb.stat().st_size < 20_000
    with pytest.raises(DataError, match=r"bomb.gz: line 2 is longer than"):
        read_lines(bomb)
    plain = tmp_path / "plain.txt"
    plain.write_bytes("\ufeffeins\r\nzwei\n\ndrei".encode())
    assert read_lines(plain) == ["eins", "zwei", "", "drei"]


@pytest.mark.parametrize("compress", [False, True])
def test_a_pipe_is_read_once_plain_or_gzipped(tmp_path, compress):
    """A FIFO (process substitution, /dev/stdin) can be read only once: no peeking by reopening."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = "eins\nzwei\n".encode()
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(data) if compress else data))
    writer.start()
    try:
        assert read_lines(fifo) == ["eins", "zwei"]
    finally:
        writer.join(timeout=10)


class _Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")


def test_stdin_invalid_utf8_bom_and_closed(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Stdin(b"Ein Hund .\nEin \xff Hund\n"))
    assert main(["translate", "--model", str(run_dir), "--precision", "fp32"]) == 2
    assert "<stdin>: line 2: invalid UTF-8 (byte 0xff)" in _one_error_line(capsys)
    monkeypatch.setattr("sys.stdin", _Stdin("Ein Hund .\n".encode()))
    assert main(["translate", "--model", str(run_dir), "--precision", "fp32", "--beam", "1"]) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", _Stdin("\ufeffEin Hund .\n".encode()))
    assert main(["translate", "--model", str(run_dir), "--precision", "fp32", "--beam", "1"]) == 0
    assert capsys.readouterr().out == plain
    monkeypatch.setattr("sys.stdin", None)
    assert main(["translate", "--model", str(run_dir), "--precision", "fp32"]) == 2
    assert "stdin is closed" in _one_error_line(capsys)


def test_output_problems_are_found_before_the_work(run_dir, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        pytest.fail("translated before checking the output")

    monkeypatch.setattr(Translator, "translate", refuse)
    source = tmp_path / "src.de"
    source.write_text("Ein Hund .\n")
    missing = tmp_path / "no" / "such" / "out.txt"
    assert main(["translate", "--model", str(run_dir), "--input", str(source), "--output", str(missing)]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert main(["evaluate", "--model", str(run_dir), "--src", str(source), "--ref", str(source),
                 "--save-hyp", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys)


# --- command-line values ----------------------------------------------------------------------


def test_wrong_values_give_one_line_and_status_2(text_files, run_dir, tmp_path, capsys):
    recipes = {"list.yaml": "- a\n- b\n", "scalar.yaml": "42\n", "unknown.yaml": "model:\n  foo: 1\n",
               "section.yaml": "train: 3\n", "bad.yaml": "model: [\n"}
    expected = {"list.yaml": "a recipe is a mapping", "scalar.yaml": "a recipe is a mapping",
                "unknown.yaml": "unknown ModelConfig fields ['foo']", "section.yaml": "'train' must be a mapping",
                "bad.yaml": "invalid YAML"}
    for name, text in recipes.items():
        (tmp_path / name).write_text(text)
        assert _train(text_files, tmp_path / f"out-{name}", "--config", str(tmp_path / name)) == 2
        line = _one_error_line(capsys)
        assert expected[name] in line
    for option, value, message in (("--model", "dropout=abc", "dropout must be a number"),
                                   ("--set", "warmup_steps=[1", "is not valid YAML"),
                                   ("--set", "lr_scale=.nan", "lr_scale must be")):
        assert _train(text_files, tmp_path / "out-values", option, value) == 2
        assert message in _one_error_line(capsys)
    assert not (tmp_path / "out-values").exists()  # nothing written before the values are checked
    assert main(["translate", "--model", str(run_dir), "--beam", "100000"]) == 2
    assert "beam_size must be an int in [1, 128]" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(run_dir, text_files, tmp_path, capsys):
    assert main(["translate", "--model", str(run_dir), "--device", "cuda"]) == 2
    assert "device cuda asked for" in _one_error_line(capsys)
    assert _train(text_files, tmp_path / "gpu", "--device", "cuda") == 2
    assert "device cuda asked for" in _one_error_line(capsys)


def test_serve_on_a_port_in_use_says_so_before_loading(run_dir, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    monkeypatch.setattr("aiayn.serve.app.serve", lambda *a, **k: pytest.fail("served on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(run_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in _one_error_line(capsys)


def test_serve_limits_from_the_command_line(run_dir, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    seen = {}
    monkeypatch.setattr("aiayn.serve.app.serve", lambda *args, **kwargs: seen.update(kwargs))
    assert main(["serve", "--model", str(run_dir), "--port", "0", "--max-queue", "7", "--request-timeout", "2.5",
                 "--keep-alive", "3", "--max-attention-weights", "5000"]) == 0
    limits = seen["limits"]
    assert (limits.max_queue, limits.request_timeout_s, limits.keep_alive_s, limits.max_attention_weights,
            limits.max_chars) == (7, 2.5, 3, 5000, 1000)
    assert main(["serve", "--model", str(run_dir), "--port", "0", "--max-queue", "0"]) == 2
    assert "max_queue must be a positive int, got 0" in _one_error_line(capsys)


def test_an_unexpected_exception_is_one_line_with_status_1(monkeypatch, capsys):
    def broken(args):
        raise TypeError("a defect")

    monkeypatch.setattr("aiayn.cli._run_info", broken)
    from aiayn import cli

    parser = cli.build_parser()
    args = parser.parse_args(["info"])
    args.handler = broken
    assert cli._run(args) == 1
    assert "internal error: TypeError: a defect" in _one_error_line(capsys)


# --- training into a directory ----------------------------------------------------------------


def test_a_fresh_run_never_overwrites_or_mixes_an_existing_one(text_files, run_dir, tmp_path, capsys):
    directory = _copy(run_dir, tmp_path)
    before = {name: _digest(directory / name) for name in ("model.safetensors", "tokenizer.model", "config.json")}
    assert _train(text_files, directory, steps=1) == 2
    line = _one_error_line(capsys)
    assert "already holds a training run" in line and "--resume" in line and "--overwrite" in line
    # A typo aimed at the existing model, even with --overwrite, is refused before anything is written.
    assert _train(text_files, directory, "--model", "foo=1", "--overwrite") == 2
    assert "foo" in _one_error_line(capsys)
    assert {name: _digest(directory / name) for name in before} == before
    assert load_model(directory)[0].config.vocab_size == 200
    # --overwrite replaces the run: none of the old run's checkpoints survive.
    old = {p.name: _digest(p / "model.safetensors") for p in checkpoint_paths(directory)}
    assert _train(text_files, directory, "--overwrite", steps=2) == 0
    new = checkpoint_paths(directory)
    assert [p.name for p in new] == ["step_00000001", "step_00000002"]
    assert all(_digest(p / "model.safetensors") != old[p.name] for p in new)
    assert _train(text_files, tmp_path / "other", "--resume", "--overwrite") == 2


def test_prepare_run_directory_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="other files"):
        prepare_run_directory(tmp_path)
    assert prepare_run_directory(tmp_path, overwrite=True) == ["log.jsonl"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert prepare_run_directory(tmp_path / "new") == []


def test_average_checks_last_and_refuses_to_mix_runs(run_dir, tmp_path, capsys):
    for last in ("0", "-2"):
        assert main(["average", "--run", str(run_dir), "--last", last, "--out", str(tmp_path / "avg")]) == 2
        assert "--last must be >= 1" in _one_error_line(capsys)
    assert not (tmp_path / "avg").exists()
    mixed = _copy(run_dir, tmp_path, "mixed")
    newest = checkpoint_paths(mixed)[-1]
    weights = load_file(str(newest / "model.safetensors"))
    save_file(weights, str(newest / "model.safetensors"), metadata={"format_version": "1", "run_id": "another"})
    with pytest.raises(ValueError, match="come from different runs"):
        average_run(mixed, 2, tmp_path / "avg")
    # The same run's checkpoints average (and say which).
    paths = average_run(run_dir, 2, tmp_path / "avg3")
    assert [p.name for p in paths] == ["step_00000002", "step_00000003"]


# --- checkpoint recovery ----------------------------------------------------------------------


def test_resume_skips_an_unreadable_newest_checkpoint_and_cleans_leftovers(text_files, run_dir, tmp_path, capsys):
    directory = _copy(run_dir, tmp_path)
    newest = checkpoint_paths(directory)[-1]
    (newest / "model.safetensors").write_bytes(b"")  # what a power loss before the data was on disk leaves
    (directory / "checkpoints" / ".tmp_killed").mkdir()
    (directory / ".model.safetensors.abc.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert _train(text_files, directory, "--resume", steps=4) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable checkpoint(s), resuming from step_00000002" in captured.err
    assert "resumed from" in captured.out and "step_00000002" in captured.out
    assert "removed 2 leftover(s)" in captured.out
    names = sorted(p.name for p in (directory / "checkpoints").iterdir())
    assert names == [".broken_step_00000003", "step_00000001", "step_00000002", "step_00000003", "step_00000004"]
    assert not list(directory.glob(".*.tmp"))
    # Every checkpoint left is readable and one run's: averaging works.
    assert len(average_run(directory, 3, tmp_path / "avg")) == 3


def test_resume_gives_a_clear_error_when_no_checkpoint_can_be_read(run_dir, tmp_path):
    directory = _copy(run_dir, tmp_path)
    for path in checkpoint_paths(directory):
        (path / "state.pt").write_bytes(b"\x80garbage")
    with pytest.raises(ValueError, match="no checkpoint of .* can be read"):
        latest_checkpoint(directory)


def test_log_has_each_step_once_after_a_resume(text_files, run_dir, tmp_path):
    directory = _copy(run_dir, tmp_path)
    shutil.rmtree(checkpoint_paths(directory)[-1])  # killed after step 3 was logged, before it was saved
    with open(directory / "log.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 1.0')  # and a torn last line
    assert _train(text_files, directory, "--resume", steps=4) == 0
    steps = [json.loads(line)["step"] for line in (directory / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]


def test_files_are_fsynced_and_follow_the_umask(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    tokenizer = Tokenizer.train([f"satz {i} mit worten" for i in range(50)], vocab_size=40)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    old = os.umask(0o027)
    try:
        save_model(model, tokenizer, tmp_path / "m")
        save_checkpoint(tmp_path / "m", model, {"step": 1}, keep_last=2)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE((tmp_path / "m" / "checkpoints" / "step_00000001").stat().st_mode) == 0o750
    # each file's data, then the directory entry that names it
    assert any(p.endswith(".tmp") for p in synced) and str(tmp_path / "m") in synced
    assert any("checkpoints/.tmp_" in p and p.endswith("state.pt") for p in synced)
    assert str(tmp_path / "m" / "checkpoints") in synced


def test_a_distributed_run_sets_a_collective_timeout(monkeypatch):
    import torch.distributed as dist

    from aiayn.training.train import distributed_context

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    assert distributed_context("cpu", 42) == (1, 2, 0)
    assert seen["timeout"].total_seconds() == 42 and seen["backend"] == "gloo"
    assert TrainConfig().distributed_timeout_s == 300


@pytest.mark.slow
def test_loading_a_model_imports_no_compiler_machinery(tiny_model_dir):
    """Checking the weights' shapes builds the model on the meta device without its random
    initialisers, which there would import torch._dynamo: seconds of every command's start-up."""
    import subprocess
    import sys

    code = (f"import sys; from aiayn.files.checkpoint import load_model; load_model({str(tiny_model_dir)!r}); "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
