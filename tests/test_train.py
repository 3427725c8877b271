"""Training: loss, schedule, exact resume, checkpoint averaging, DDP equivalence, end to end."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aiayn import ModelConfig, Transformer
from aiayn.config import TrainConfig
from aiayn.files.data import encode_parallel, read_parallel
from aiayn.files.tokenizer import Tokenizer
from aiayn.files.checkpoint import average_checkpoints, checkpoint_paths, latest_checkpoint, load_model, save_checkpoint
from aiayn.training.optim import inverse_sqrt_rate as learning_rate
from aiayn.training.loop import fit
from aiayn.training.train import TrainingDiverged, label_smoothed_nll_loss
from conftest import MULTI30K

DATA = MULTI30K
ROOT = Path(__file__).resolve().parents[1]


# --- loss and schedule ----------------------------------------------------------------------


def test_label_smoothing_zero_is_nll_and_padding_is_ignored():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    target = torch.tensor([3, 5, 0, 7, 0, 1])
    loss, nll = label_smoothed_nll_loss(logits, target, 0.0, ignore_index=0)
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=0, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
    # Changing the logits of padded positions changes nothing.
    changed = logits.clone()
    changed[target == 0] = torch.randn(2, 11) * 100
    assert label_smoothed_nll_loss(changed, target, 0.1, ignore_index=0)[0].item() == pytest.approx(
        label_smoothed_nll_loss(logits, target, 0.1, ignore_index=0)[0].item(), rel=1e-6
    )


def test_label_smoothing_matches_the_smoothed_distribution():
    torch.manual_seed(1)
    logits = torch.randn(4, 9)
    target = torch.tensor([1, 2, 3, 4])
    eps = 0.1
    q = torch.full((4, 9), eps / 9)
    q[torch.arange(4), target] += 1 - eps
    expected = -(q * torch.log_softmax(logits, -1)).sum()
    assert label_smoothed_nll_loss(logits, target, eps)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    builtin = torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps, reduction="sum")
    assert expected.item() == pytest.approx(builtin.item(), rel=1e-6)


def test_learning_rate_schedule_values():
    # Paper base: d_model 512, warmup 4000 -> peak 512^-0.5 * 4000^-0.5 = 6.988e-4 at step 4000.
    assert learning_rate(4000, d_model=512, warmup_steps=4000) == pytest.approx(6.9877e-4, rel=1e-4)
    assert learning_rate(1, d_model=512, warmup_steps=4000) == pytest.approx(512**-0.5 * 4000**-1.5, rel=1e-9)
    assert learning_rate(2000, d_model=512, warmup_steps=4000) == pytest.approx(3.4939e-4, rel=1e-4)
    assert learning_rate(16000, d_model=512, warmup_steps=4000) == pytest.approx(3.4939e-4, rel=1e-4)
    assert learning_rate(100, d_model=256, warmup_steps=800, scale=0.7) == pytest.approx(
        0.7 / 16 * 100 * 800**-1.5, rel=1e-9
    )


def test_train_config_validation():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"batch_token": 10})
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_average_checkpoints_of_known_state_dicts(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.0, 4.0]])}
    b = {"w": torch.tensor([3.0, 2.0, -1.0]), "b": torch.tensor([[2.0, 0.0]])}
    for name, state in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    averaged = average_checkpoints([tmp_path / "a", tmp_path / "b"])
    assert torch.equal(averaged["w"], torch.tensor([2.0, 2.0, 1.0]))
    assert torch.equal(averaged["b"], torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        average_checkpoints([])


# --- fit ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    if not DATA.is_dir():
        pytest.skip(f"Multi30k not found at {DATA}")
    text = read_parallel(DATA / "val.de.gz", DATA / "val.en.gz")
    text.src, text.tgt, text.line_numbers = text.src[:300], text.tgt[:300], text.line_numbers[:300]
    tokenizer = Tokenizer.train(text.src + text.tgt, vocab_size=300)
    return tokenizer, encode_parallel(tokenizer, text, 64), text


def _config(**overrides) -> TrainConfig:
    values = dict(batch_tokens=600, lr_scale=1.0, warmup_steps=4, max_steps=6, log_every=1, eval_every=0,
                  save_every=3, keep_last=3, seed=3, threads=1)
    return TrainConfig(**{**values, **overrides})


def _model(tokenizer, **overrides) -> Transformer:
    torch.manual_seed(0)
    values = {"vocab_size": tokenizer.vocab_size, "dropout": 0.1, **overrides}
    return Transformer(ModelConfig.preset("tiny", **values))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_resume_after_interrupt_is_exact(tmp_path, corpus):
    tokenizer, train, _ = corpus
    fit(_model(tokenizer), tokenizer, train, _config(), tmp_path / "straight", progress=False)
    # "Killed" after step 3: a run that stops there, then a fresh process state that resumes.
    fit(_model(tokenizer), tokenizer, train, _config(max_steps=3), tmp_path / "resumed", progress=False)
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG
    summary = fit(_model(tokenizer), tokenizer, train, _config(), tmp_path / "resumed", resume=True, progress=False)
    assert summary["steps"] == 6
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert (straight[name] - resumed[name]).abs().max().item() <= 1e-6, name
    # The check is not vacuous: the weights moved away from the initialisation.
    initial = _model(tokenizer).state_dict()
    assert max((straight[n] - initial[n]).abs().max().item() for n in straight) > 1e-3
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_kept_and_model_directory_loads(tmp_path, corpus):
    tokenizer, train, _ = corpus
    fit(_model(tokenizer), tokenizer, train, _config(max_steps=8, save_every=2, keep_last=2), tmp_path, progress=False)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000006", "step_00000008"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    model, loaded_tokenizer, info = load_model(tmp_path)
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert info["step"] == 8
    assert (tmp_path / "curves.png").stat().st_size > 1000
    weights = _weights(tmp_path / "checkpoints" / "step_00000008")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_nan_loss_stops_with_clear_message(tmp_path, corpus, monkeypatch):
    tokenizer, train, _ = corpus
    fit(_model(tokenizer), tokenizer, train, _config(max_steps=3), tmp_path, progress=False)
    import aiayn.training.train as train_module

    original = train_module.label_smoothed_nll_loss

    def poisoned(logits, target, epsilon, ignore_index=None):
        loss, nll = original(logits, target, epsilon, ignore_index)
        return loss * float("nan"), nll

    monkeypatch.setattr(train_module, "label_smoothed_nll_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step_00000003"):
        fit(_model(tokenizer), tokenizer, train, _config(max_steps=6), tmp_path, resume=True, progress=False)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000003"]


@pytest.mark.slow
def test_validation_writes_bleu_and_keeps_best(tmp_path, corpus):
    tokenizer, train, text = corpus
    config = _config(max_steps=4, eval_every=2, valid_max_sentences=20)
    summary = fit(_model(tokenizer), tokenizer, train, config, tmp_path, valid_corpus=train,
                  valid_references=text.tgt, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    bleus = [r["valid_bleu"] for r in records if "valid_bleu" in r]
    assert len(bleus) == 2 and summary["best_valid_bleu"] == pytest.approx(max(bleus))
    assert all(math.isfinite(r["valid_loss"]) for r in records if "valid_loss" in r)


# --- distributed ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_WORKER = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from test_train import _config, _model
from aiayn.files.data import encode_parallel, read_parallel
from aiayn.files.tokenizer import Tokenizer
from aiayn.training.loop import fit
tokenizer = Tokenizer.load(sys.argv[2])
text = read_parallel(sys.argv[3] + "/val.de.gz", sys.argv[3] + "/val.en.gz")
text.src, text.tgt, text.line_numbers = text.src[:300], text.tgt[:300], text.line_numbers[:300]
train = encode_parallel(tokenizer, text, 64)
fit(_model(tokenizer, dropout=0.0), tokenizer, train, _config(accumulate=int(sys.argv[5]), save_every=0),
    sys.argv[4], progress=False)
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


@pytest.mark.slow(seconds=20)
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path, corpus):
    """2 gloo processes x 1 batch == 1 process accumulating 2 batches (the same global batch)."""
    tokenizer, _, _ = corpus
    tokenizer.save(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    common = [sys.executable, str(script), str(ROOT / "tests"), str(tmp_path), str(DATA)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([*common, str(tmp_path / "single"), "2"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    workers = [
        subprocess.Popen(
            [*common, str(tmp_path / "ddp"), "1"],
            env={**env, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
    single_w, ddp_w = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for name in single_w:
        assert (single_w[name] - ddp_w[name]).abs().max().item() < 1e-5, name
    initial = _model(tokenizer, dropout=0.0).state_dict()
    assert max((single_w[n] - initial[n]).abs().max().item() for n in single_w) > 1e-3


# --- command line end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_translate_evaluate_end_to_end(tmp_path, capsys):
    """fairseq test_binaries style: train a tiny model from text files, average, translate, score."""
    from aiayn.cli import main

    if not DATA.is_dir():
        pytest.skip(f"Multi30k not found at {DATA}")
    text = read_parallel(DATA / "val.de.gz", DATA / "val.en.gz")
    for split, rows in (("train", slice(0, 400)), ("valid", slice(400, 440))):
        (tmp_path / f"{split}.de").write_text("\n".join(text.src[rows]) + "\n", encoding="utf-8")
        (tmp_path / f"{split}.en").write_text("\n".join(text.tgt[rows]) + "\n", encoding="utf-8")
    out = tmp_path / "model"
    code = main([
        "train", "--train-src", str(tmp_path / "train.de"), "--train-tgt", str(tmp_path / "train.en"),
        "--valid-src", str(tmp_path / "valid.de"), "--valid-tgt", str(tmp_path / "valid.en"),
        "--preset", "tiny", "--vocab-size", "300", "--out", str(out), "--max-steps", "6",
        "--batch-tokens", "800", "--set", "eval_every=3", "--set", "save_every=2", "--threads", "1",
        "--no-progress",
    ])
    assert code == 0
    assert main(["average", "--run", str(out), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert main(["translate", "--model", str(tmp_path / "avg"), "--beam", "2",
                 "--input", str(tmp_path / "valid.de"), "--output", str(tmp_path / "hyp.en")]) == 0
    hyps = (tmp_path / "hyp.en").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 40
    capsys.readouterr()
    assert main(["evaluate", "--hyp", str(tmp_path / "hyp.en"), "--ref", str(tmp_path / "valid.en"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores["bleu"] <= 100.0 and scores["sentences"] == 40


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from aiayn.cli import main

    (tmp_path / "a.de").write_text("eins\nzwei\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("one\n", encoding="utf-8")
    code = main(["train", "--train-src", str(tmp_path / "a.de"), "--train-tgt", str(tmp_path / "a.en"),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a.de" in err and "a.en" in err and "2" in err and "1" in err
    assert "Traceback" not in err
    assert main(["train", "--data", "multi30k:de-xx", "--out", str(tmp_path / "o")]) == 2
    assert "xx" in capsys.readouterr().err


def test_published_recipes_are_valid():
    from aiayn.training.recipe import load_recipe

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        recipe = load_recipe(path)
        TrainConfig.from_dict(recipe.get("train", {}))
        ModelConfig.preset(recipe["preset"], **recipe.get("model", {}))
        # Every recipe runs on any machine: bf16 only where it is native and faster.
        assert recipe.get("train", {}).get("precision", "auto") == "auto", path.name
    for name in ("wmt14-en-de-base.yaml", "wmt14-en-de-big.yaml"):
        train = load_recipe(ROOT / "configs" / name)["train"]
        # The paper's batches hold ~25k source + 25k target tokens per update (section 5.1).
        assert 24000 <= train["batch_tokens"] * train["accumulate"] <= 27000


def test_recipes_ship_with_the_package_and_answer_to_their_names(capsys):
    from aiayn.cli import main
    from aiayn.training.recipe import find_recipe, recipes

    shipped = recipes()
    # The repository's configs/ is the package's recipes, not a copy.
    assert sorted(shipped) == sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    assert all(path.parent.name == "recipes" and path.parent.parent.name == "aiayn" for path in shipped.values())
    assert find_recipe("demo") == shipped["multi30k-de-en-demo"]
    assert find_recipe("multi30k-de-en") == shipped["multi30k-de-en"]  # an exact name beats a suffix
    with pytest.raises(ValueError, match="ambiguous: multi30k-de-en-1h, multi30k-en-de-1h"):
        find_recipe("1h")
    with pytest.raises(ValueError, match="no recipe named 'nope'; the recipes are multi30k-de-en-1h"):
        find_recipe("nope")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "multi30k-de-en-demo  (multi30k:de-en" in out and "wmt14-en-de-big  (your own data, preset big)" in out
    assert main(["train", "--recipe", "1h", "--out", "unused"]) == 2
    assert "aiayn train: error: recipe '1h' is ambiguous" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        main(["train", "--recipe", "demo", "--config", "x.yaml"])


@pytest.mark.slow
def test_the_wheel_carries_the_recipes(tmp_path):
    import subprocess
    import sys
    import zipfile

    import shutil

    # Built from a copy: setuptools writes build/ beside pyproject.toml.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("aiayn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/")[-1][:-5] for n in names if n.startswith("aiayn/recipes/")) == sorted(
        path.stem for path in (ROOT / "configs").glob("*.yaml"))


def test_sigterm_stops_after_the_update_with_a_checkpoint(tmp_path, corpus, monkeypatch):
    import os
    import signal

    import aiayn.training.loop as loop_module

    tokenizer, train, _ = corpus
    original = loop_module.learning_rate_for

    def signalling(config, *, step, **kwargs):  # called at the start of each update
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(config, step=step, **kwargs)

    monkeypatch.setattr(loop_module, "learning_rate_for", signalling)
    before = signal.getsignal(signal.SIGTERM)
    summary = fit(_model(tokenizer), tokenizer, train, _config(max_steps=6), tmp_path, progress=False)
    assert summary["steps"] == 3  # update 3 finished, then the run stopped instead of dying
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000003"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    monkeypatch.setattr(loop_module, "learning_rate_for", original)
    resumed = fit(_model(tokenizer), tokenizer, train, _config(max_steps=6), tmp_path, resume=True, progress=False)
    assert resumed["steps"] == 6


def test_fit_precision_auto_follows_capability_and_measurement(tmp_path, corpus, monkeypatch, capsys):
    from test_hardware import AVX2, SAPPHIRE_RAPIDS

    from aiayn import hardware
    from aiayn.training import loop

    tokenizer, data, _ = corpus

    def refuse(*args, **kwargs):
        raise AssertionError("no measurement where bf16 is not native")

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    monkeypatch.setattr(loop, "training_timings", refuse)
    summary = fit(_model(tokenizer), tokenizer, data, _config(precision="auto", max_steps=1), tmp_path / "a",
                  progress=False)
    assert summary["precision"] == "fp32"
    assert "precision auto -> fp32 (no native bf16 on this CPU (AMD EPYC 7B13 (Zen 3)))" in capsys.readouterr().out
    # The request is what is saved: a resumed run resolves it again, on its own machine.
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["precision"] == "auto"

    monkeypatch.setattr(hardware, "detect", lambda: SAPPHIRE_RAPIDS)
    for seconds, expected in (({"fp32": 2.0, "bf16": 1.0}, "bf16"), ({"fp32": 1.0, "bf16": 1.0}, "fp32")):
        monkeypatch.setattr(loop, "training_timings", lambda *args, seconds=seconds, **kwargs: seconds)
        summary = fit(_model(tokenizer), tokenizer, data, _config(precision="auto", max_steps=1),
                      tmp_path / expected, progress=False)
        assert summary["precision"] == expected


def test_training_timings_leave_the_model_and_random_state_alone(corpus):
    from aiayn.files.data import BatchIterator
    from aiayn.training.train import training_timings

    tokenizer, data, _ = corpus
    model = _model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(BatchIterator(data, 600, shuffle=False))[:2]
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    seconds = training_timings(model, batches, torch.device("cpu"), repeats=1)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < 60 for s in seconds.values())
    assert torch.equal(torch.rand(3), expected_next)  # dropout in the probe drew from a forked generator
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_each_rank_resumes_with_its_own_random_state():
    from aiayn.training.train import state_of_rank

    states = [torch.tensor([0, 1], dtype=torch.uint8), torch.tensor([2, 3], dtype=torch.uint8)]
    assert [state_of_rank(states, rank).tolist() for rank in (0, 1, 2)] == [[0, 1], [2, 3], [0, 1]]
    legacy = torch.tensor([7, 7], dtype=torch.uint8)  # before per-rank CUDA states: one for all
    assert state_of_rank(legacy, 1) is legacy


def test_checkpoints_round_trip_without_a_training_run(tmp_path):
    # What resume reads back is what was written: weights, and the training state as given.
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    states = []
    for step in (1, 2, 3):
        with torch.no_grad():
            model.src_embedding.weight.add_(1.0)
        state = {"step": step, "rng": [torch.get_rng_state()], "best_bleu": 10.0 + step, "elapsed": 2.5 * step}
        save_checkpoint(tmp_path, model, state, keep_last=2)
        states.append(state)
    assert [path.name for path in checkpoint_paths(tmp_path)] == ["step_00000002", "step_00000003"]
    path, weights, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000003" and state["step"] == 3 and state["best_bleu"] == 13.0
    assert torch.equal(state["rng"][0], states[-1]["rng"][0])
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        latest_checkpoint(tmp_path / "empty")


def test_train_step_is_one_update_and_a_nan_leaves_the_weights(corpus):
    from aiayn.files.data import BatchIterator
    from aiayn.training.train import TranslationLoss, train_step

    tokenizer, data, _ = corpus
    model = _model(tokenizer).train()
    criterion = TranslationLoss(model, label_smoothing=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    batches = list(BatchIterator(data, 600, shuffle=False))[:2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, nll, tokens, stop = train_step(criterion, optimizer, batches, lr=1e-3, device=torch.device("cpu"),
                                         precision="fp32", stop_requested=True)
    assert tokens == sum(b.num_tgt_tokens for b in batches) and stop
    assert 0 < nll < loss  # label smoothing adds to the plain NLL
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # ready for the next update
    with torch.no_grad():
        model.src_embedding.weight[5:, 0] = float("nan")  # shared with the output layer: NaN logits
    poisoned = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        train_step(criterion, optimizer, batches, lr=1e-3, device=torch.device("cpu"), precision="fp32")
    # No optimizer step was taken: every weight is as it was (NaN where it was NaN).
    assert all(torch.equal(poisoned[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())


def test_training_state_saves_and_restores_without_a_run(tmp_path, corpus):
    from aiayn.files.data import BatchIterator
    from aiayn.training.loop import TrainingState, load_training_state, save_training_state
    from aiayn.training.train import TranslationLoss, train_step

    tokenizer, data, _ = corpus

    def parts():
        model = _model(tokenizer).train()
        return model, torch.optim.Adam(model.parameters(), lr=0.0), BatchIterator(data, 600, shuffle=True, seed=3)

    model, optimizer, iterator = parts()
    stream = iter(iterator)
    for _ in range(2):
        train_step(TranslationLoss(model, label_smoothing=0.1), optimizer, [next(stream)], lr=1e-3,
                   device=torch.device("cpu"), precision="fp32")
    torch.manual_seed(99)
    save_training_state(tmp_path, model, optimizer, iterator, TrainingState(2, 12.5, 30.0, "run-a", 3.5e12),
                        elapsed=40.0, keep_last=2)
    expected_draw = torch.rand(2)
    torch.manual_seed(0)  # a fresh process state
    fresh_model, fresh_optimizer, fresh_iterator = parts()
    state, path = load_training_state(tmp_path, fresh_model, fresh_optimizer, fresh_iterator)
    assert (state, path.name) == (TrainingState(2, 12.5, 40.0, "run-a", 3.5e12), "step_00000002")
    assert all(torch.equal(v, fresh_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 2
    assert fresh_iterator.position == iterator.position == 2
    assert torch.equal(torch.rand(2), expected_draw)  # the random stream continues where it was saved
