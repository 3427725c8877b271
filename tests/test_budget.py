"""Training compute, budgeted schedules and the optimizers (aiayn.training.compute, aiayn.training.optim)."""

import json
import math

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.training.compute import batches_flops, stack_parameters, step_flops
from aiayn.config import OPTIMIZERS, TrainConfig
from aiayn.files.data import BatchIterator
from aiayn.training.optim import (BudgetEstimate, Muon, OptimizerGroup, budgeted_rate, build_optimizer,
                                  learning_rate_for, orthogonalize)
from aiayn.training.loop import fit
from test_train import _config, _model, corpus  # noqa: F401  (corpus is a fixture)

TINY = ModelConfig.preset("tiny")


# --- compute --------------------------------------------------------------------------------


def test_stack_parameters_are_the_models_own_non_embedding_parameters():
    model = Transformer(TINY)
    counted = {"encoder_layers": 0, "decoder_layers": 0}
    for name, parameter in model.named_parameters():
        for stack in counted:
            if name.startswith(stack):
                counted[stack] += parameter.numel()
    assert stack_parameters(TINY) == (counted["encoder_layers"], counted["decoder_layers"])


def test_step_flops_counts_real_tokens_and_padded_attention():
    pad = TINY.pad_id
    src = torch.tensor([[5, 6, 7], [5, 6, pad]])  # 5 real source tokens, S = 3, B = 2
    tgt = torch.tensor([[8, 9, 3, pad], [8, 3, pad, pad]])  # 5 real targets, T = 4
    encoder, decoder = stack_parameters(TINY)
    expected = (6 * (encoder * 5 + decoder * 5) + 6 * TINY.vocab_size * TINY.d_model * 5
                + 12 * TINY.d_model * 2 * (TINY.n_encoder_layers * 9 + TINY.n_decoder_layers * (16 + 12)))
    assert step_flops(TINY, src, tgt) == expected
    # Padding rows beyond the real tokens cost attention but no weight FLOPs.
    wider = torch.cat([src, torch.full((2, 1), pad)], dim=1)
    extra = 12 * TINY.d_model * 2 * (TINY.n_encoder_layers * (16 - 9) + TINY.n_decoder_layers * 4)
    assert step_flops(TINY, wider, tgt) - expected == extra


# --- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_budgeted_schedules_warm_up_then_end_at_zero(schedule):
    total, peak = 200, 1e-3
    rates = [budgeted_rate(step, total, schedule=schedule, peak=peak, warmup_fraction=0.05) for step in range(1, 202)]
    # Linear warmup over the first 10 updates.
    assert rates[0] == pytest.approx(peak * 0.1, rel=1e-9)
    decay_at_5 = {"constant": 1.0, "wsd": 1.0, "linear": 1 - 4 / 200, "cosine": 0.5 * (1 + math.cos(math.pi * 4 / 200))}
    assert rates[4] == pytest.approx(peak * 0.5 * decay_at_5[schedule], rel=1e-9)
    assert max(rates) <= peak
    if schedule == "constant":
        assert rates[199] == peak
    else:
        assert rates[200] == 0.0  # the update after the budget: zero
        assert rates[199] < 0.03 * peak  # the budget's last update: nearly zero
    if schedule == "linear":
        assert rates[100] == pytest.approx(peak * (1 - 100 / 200))
    if schedule == "cosine":
        assert rates[100] == pytest.approx(peak * 0.5)
    if schedule == "wsd":  # the peak until the last 20%, then linear to zero
        assert rates[159] == peak
        assert rates[180] == pytest.approx(peak * (1 - 180 / 200) / 0.2)


def test_inverse_sqrt_is_the_paper_and_ignores_the_budget():
    config = TrainConfig(warmup_steps=4000)
    assert learning_rate_for(config, d_model=512, step=4000, total_updates=10) == pytest.approx(6.9877e-4, rel=1e-4)


def test_budgeted_schedule_without_a_budget_is_refused():
    with pytest.raises(ValueError, match="max_steps, max_epochs, max_minutes or max_tflop"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step", max_steps=3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lamb")
    TrainConfig(schedule="cosine", max_tflop=1.5)


def test_budget_estimate_takes_the_budget_that_ends_first():
    budget = BudgetEstimate(updates_per_epoch=100, flops_per_update=2e9, seconds_per_update=0.5)
    config = TrainConfig(max_tflop=1.0, schedule="linear")
    assert budget.total_updates(config, step=0, epochs=0, flops=0, seconds=0) == 500
    assert budget.total_updates(config, step=100, epochs=1, flops=0.4e12, seconds=0) == 100 + 300
    both = config.replace(max_minutes=1.0)  # 60 s at 0.5 s per update: 120 updates, before the TFLOP run out
    assert budget.total_updates(both, step=0, epochs=0, flops=0, seconds=0) == 120
    assert budget.total_updates(config.replace(max_epochs=2.0), step=0, epochs=0, flops=0, seconds=0) == 200
    assert budget.total_updates(TrainConfig(), step=0, epochs=0, flops=0, seconds=0) == math.inf


# --- optimizers -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss_of_a_fixed_batch(name):
    torch.manual_seed(0)
    model = Transformer(TINY)
    config = TrainConfig(optimizer=name, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    lr = {"sgd": 0.3, "muon": 0.02}.get(name, 3e-3)
    src = torch.randint(4, 64, (8, 7))
    tgt = torch.randint(4, 64, (8, 6))
    losses = []
    for _ in range(15):
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(src, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tgt[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_muon_takes_the_stacks_weight_matrices_and_adam_the_rest():
    model = Transformer(TINY)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, OptimizerGroup)
    muon, adam = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for p in muon.param_groups[0]["params"])
    assert "src_embedding.weight" not in in_muon and all(p.endswith(".weight") for p in in_muon)
    assert len(in_muon) == TINY.n_encoder_layers * 4 + TINY.n_decoder_layers * 6
    assert len(in_muon) + len(adam.param_groups[0]["params"]) == len(list(model.parameters()))
    restored = build_optimizer(Transformer(TINY), TrainConfig(optimizer="muon"))
    restored.load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="not this run's optimizer"):
        restored.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def _muon_steps(optimizer, weights, grads):
    for grad in grads:
        weights.grad = grad.clone()
        optimizer.step()
    return weights.detach().clone()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_in_bf16_is_torch_optim_muon_and_in_fp32_close_to_it(shape):
    torch.manual_seed(0)
    start = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    results = {}
    for name in ("torch", "bf16", "fp32"):
        weights = torch.nn.Parameter(start.clone())
        if name == "torch":
            optimizer = torch.optim.Muon([weights], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        else:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            optimizer = Muon([weights], lr=0.02, weight_decay=0.1, ns_dtype=dtype)
        results[name] = _muon_steps(optimizer, weights, grads)
    assert torch.equal(results["bf16"], results["torch"])
    moved = (results["torch"] - start).norm()
    assert moved > 0.1 and (results["fp32"] - results["torch"]).norm() < 0.05 * moved


def test_orthogonalize_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    update = torch.randn(32, 64) * torch.logspace(-1, 1, 64)  # columns over two decades
    singular = torch.linalg.svdvals(orthogonalize(update, dtype=torch.float32))
    assert singular.min() > 0.6 and singular.max() < 1.25
    assert torch.linalg.svdvals(update).max() / torch.linalg.svdvals(update).min() > 30


def test_newton_schulz_runs_in_bf16_only_where_bf16_is_native(monkeypatch):
    from aiayn import hardware
    from aiayn.training import optim

    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(hardware.Capabilities, "native_bf16", lambda self, device, n=native: n)
        assert optim.newton_schulz_dtype(torch.device("cpu")) == expected
        muon = build_optimizer(Transformer(TINY), TrainConfig(optimizer="muon")).optimizers[0]
        assert muon.ns_dtype == expected


def test_muon_refuses_what_it_cannot_orthogonalise():
    with pytest.raises(ValueError, match="2-D weight matrices"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], momentum=1.0)


# --- the training loop ----------------------------------------------------------------------


def test_fit_counts_compute_and_stops_at_a_tflop_budget(tmp_path, corpus):  # noqa: F811
    tokenizer, train, _ = corpus
    model = _model(tokenizer)
    per_batch = [batches_flops(model.config, [b]) for b in BatchIterator(train, 600, shuffle=True, seed=3)]
    budget = (sum(per_batch[:4]) - 1) / 1e12  # crossed by the 4th update
    summary = fit(model, tokenizer, train, _config(max_steps=None, max_tflop=budget, schedule="linear",
                                                   peak_lr=1e-3), tmp_path, progress=False)
    assert summary["steps"] == 4
    assert summary["tflop"] == pytest.approx(sum(per_batch[:4]) / 1e12, abs=1e-4)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["tflop"] for r in train_records] == pytest.approx(
        [round(sum(per_batch[: i + 1]) / 1e12, 4) for i in range(4)], abs=1e-4)
    # Linear decay over the budget's estimated updates: the rate falls after warmup.
    assert train_records[-1]["lr"] < train_records[0]["lr"] or len(train_records) == 1
    assert all(r["budget_updates"] >= 3 for r in train_records)


def test_resume_keeps_the_compute_count(tmp_path, corpus):  # noqa: F811
    tokenizer, train, _ = corpus
    straight = fit(_model(tokenizer), tokenizer, train, _config(max_steps=6), tmp_path / "a", progress=False)
    fit(_model(tokenizer), tokenizer, train, _config(max_steps=3), tmp_path / "b", progress=False)
    resumed = fit(_model(tokenizer), tokenizer, train, _config(max_steps=6), tmp_path / "b", resume=True,
                  progress=False)
    assert resumed["tflop"] == straight["tflop"] > 0


def test_a_minutes_budget_under_a_budgeted_schedule_probes_the_step_time(tmp_path, corpus, capsys):  # noqa: F811
    tokenizer, train, _ = corpus
    # Minutes that cannot run out in 4 updates on any machine: the step budget ends the run, and the
    # schedule's estimate is the smaller of the two.
    summary = fit(_model(tokenizer), tokenizer, train, _config(max_steps=4, max_minutes=600.0, schedule="cosine",
                                                               peak_lr=1e-3), tmp_path, progress=False)
    assert summary["steps"] == 4
    assert "schedule cosine: about 4 updates in the budget" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["budget_updates"] for r in records if "loss" in r] == [4, 4, 4, 4]
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx(
        [budgeted_rate(step, 4, schedule="cosine", peak=1e-3, warmup_fraction=0.05) for step in (1, 2, 3, 4)])


def test_mean_update_flops_is_the_epochs_mean_times_the_batches_per_update(corpus):  # noqa: F811
    from aiayn.training.compute import mean_update_flops

    tokenizer, train, _ = corpus
    config = _model(tokenizer).config
    per_batch = [batches_flops(config, [b]) for b in BatchIterator(train, 600, shuffle=False)]
    assert mean_update_flops(config, train, 600) == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-12)
    assert mean_update_flops(config, train, 600, 3) == pytest.approx(3 * sum(per_batch) / len(per_batch), rel=1e-12)
