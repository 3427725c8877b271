"""The benchmark harness: the aiayn -> Marian -> CTranslate2 weight copy computes the same function,
and `python -m benchmarks.run --smoke` writes valid JSON and Markdown where it is told to."""

import json
import sys
from pathlib import Path

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.decoding.search import greedy_search

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not of the package

PAD, BOS, EOS = 0, 2, 3


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A tiny model whose every parameter matters: LayerNorm gains / biases and all linear biases
    are random (the default ones / zeros would hide a swapped norm or a dropped bias), and a
    stronger EOS row, so greedy outputs vary in tokens and length instead of repeating one token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=48, max_positions=64)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.2)
        model.src_embedding.weight[EOS].mul_(2.0)
    return model


def sources() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    src = torch.randint(4, 48, (6, 9), generator=generator)  # [B, S]
    src[2, 4:] = PAD
    src[4, 6:] = PAD
    return src


@pytest.mark.slow
def test_marian_copy_gives_aiayn_logits(model):
    pytest.importorskip("transformers")
    from benchmarks.peers import marian_from_aiayn, marian_logits

    marian = marian_from_aiayn(model)
    src = sources()
    tgt = torch.randint(4, 48, (6, 7), generator=torch.Generator().manual_seed(4))  # [B, T]
    tgt[:, 0] = BOS
    tgt[1, 5:] = PAD
    with torch.no_grad():
        ours = model(src, tgt)  # [B, T, V]
        theirs = marian_logits(marian, src, tgt, PAD)
    keep = tgt != PAD
    assert ours.abs().max() > 1.0  # logits of a real scale, so a small difference means something
    assert (ours - theirs)[keep].abs().max() < 1e-4
    # The positions are the part most easily got wrong (Marian's [sin | cos] vs interleaved).
    with torch.no_grad():
        marian.model.decoder.embed_positions.weight.copy_(
            marian.model.decoder.embed_positions.weight.roll(1, dims=-1)
        )
        shifted = marian_logits(marian, src, tgt, PAD)
    assert (ours - shifted)[keep].abs().max() > 1e-2


@pytest.mark.slow
def test_greedy_is_identical_in_aiayn_marian_and_ctranslate2(model, tmp_path):
    pytest.importorskip("transformers")
    from benchmarks.decoding import _ct2, _hf
    from benchmarks.peers import marian_from_aiayn, vocabulary

    src = sources()
    cap = 12
    rows = [[t for t in row if t != PAD] for row in src.tolist()]
    expected = greedy_search(model, src, max_len_a=0.0, max_len_b=cap)
    assert len({len(x) for x in expected}) > 1  # outputs end at different lengths: EOS is exercised
    marian = marian_from_aiayn(model)
    hf = _hf(marian, model.config, 1, cap, torch.device("cpu"))(rows)
    assert hf == expected
    ctranslate2 = pytest.importorskip("ctranslate2")
    from benchmarks.peers import ct2_from_marian

    path = ct2_from_marian(marian, tmp_path / "ct2")
    translator = ctranslate2.Translator(str(path), device="cpu", intra_threads=1)
    ct2 = _ct2(translator, vocabulary(model.config.vocab_size), 1, cap)(rows)
    assert [x[:cap] for x in ct2] == expected  # CTranslate2 stops at cap + 1 without EOS


@pytest.mark.slow(seconds=22)
def test_smoke_run_writes_json_and_markdown(tmp_path, monkeypatch):
    from benchmarks import run

    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_bytes() if results_md.exists() else None
    json_path, md_path = tmp_path / "out.json", tmp_path / "RESULTS.md"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        run.main(["--smoke", "--threads", "1", "--json", str(json_path), "--results-md", str(md_path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(json_path.read_text())
    assert result["mode"] == "smoke"
    machine = result["machine"]
    for key in ("date", "cpu", "cores", "torch_threads", "load_average_start", "load_average_end", "git_commit"):
        assert key in machine
    assert machine["torch_threads"] == 1
    assert set(machine["versions"]) == {"python", "torch", "transformers", "ctranslate2", "aiayn"}
    training = result["training"]["shapes"]["tiny"]["results"]
    assert training[0]["system"] == "aiayn fp32" and all(r["tokens_per_s"] > 0 for r in training)
    decoding = result["decoding"]["modes"]
    assert set(decoding) == {"greedy, batch 4", "beam 2, batch 4"}
    assert decoding["greedy, batch 4"][0]["system"] == "aiayn fp32"
    assert all(r["same_output_as_aiayn"] == 1.0 for r in decoding["greedy, batch 4"] if "fp32" in r["system"])
    points = result["attention"]["points"]
    assert [p["length"] for p in points] == [64, 512]
    assert all(p["reference"]["ms"] > 0 and p["fast"]["ms"] > 0 for p in points)
    # At L=512 the reference path keeps 8 MiB score and weight matrices alive for backward; the
    # fused path does not. Seeing that proves the peak is measured in the child process (not
    # inherited from this large pytest process).
    assert points[1]["reference"]["peak_mib"] > points[1]["fast"]["peak_mib"] + 12
    text = md_path.read_text()
    machine_class = machine["machine_class"]
    assert text.startswith(f"<!-- latest run, machine class {machine_class} -->\n## {machine_class} CPU: ")
    assert "| aiayn fp32 |" in text and "### Attention memory" in text
    assert (results_md.read_bytes() if results_md.exists() else None) == before


def test_results_keep_the_latest_run_per_machine_class(tmp_path):
    from benchmarks.report import update_results

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nHow to read them.\n")
    update_results(results, "## AVX2 CPU: run 1\n\n| a | 1 |\n", "AVX2")
    update_results(results, "## AMX CPU: run 2\n", "AMX")
    update_results(results, "## AVX2 CPU: run 3\n", "AVX2")
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nHow to read them.\n\n")
    assert "run 3" in text and "run 2" in text and "run 1" not in text
    assert text.index("AVX2 CPU: run 3") < text.index("AMX CPU: run 2")  # each class keeps its place
    assert not (tmp_path / "HISTORY.md").exists()  # earlier runs are git's to keep


@pytest.mark.slow
def test_decoding_benchmark_without_native_bf16_or_vnni_runs_only_fast_systems(monkeypatch):
    from test_hardware import AVX2

    from aiayn import hardware
    from benchmarks import decoding, workload

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    sources = workload.decoding_sources(2)
    result = decoding.run(sources, batch_sizes=[2], beams=[1], threads=1, device=torch.device("cpu"))
    systems = [row["system"] for row in result["modes"]["greedy, batch 2"]]
    assert systems[0] == "aiayn fp32" and "aiayn bf16" not in systems and "aiayn int8" not in systems
    assert not any("bf16" in name for name in systems)  # the peers' bf16 too: a reference GEMM here
    assert "no native bf16 on this device: bf16 systems skipped" in result["notes"]
    assert "no VNNI on this CPU: aiayn int8 systems skipped" in result["notes"]
