"""`aiayn explain`: every explained number reproduces the others and the model's own forward pass."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.files.checkpoint import save_model
from aiayn.cli import main
from aiayn.explain import KINDS, explain, format_walk, walk_json, write_html
from aiayn.files.tokenizer import Tokenizer
from aiayn.decoding.translator import Translator

SOURCE = "zwei hunde spielen im schnee ."
NEIGHBOUR = "ein mann mit einem roten hut fährt mit dem fahrrad über eine lange brücke ."
TEXT = [SOURCE, NEIGHBOUR, "two dogs play in the snow .", "a man rides a bike across a long bridge .",
        "eine frau liest ein buch .", "a woman reads a book ."] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, vocab_size=80)


def _model(tokenizer, **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, **overrides)
    return Transformer(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}, {"positional_encoding": "learned",
                                                                   "share_embeddings": False},
                                       {"positional_encoding": "rope"}, {"positional_encoding": "alibi"},
                                       {"positional_encoding": "relative"}, {"positional_encoding": "none"},
                                       {"positional_encoding": "rope", "norm_first": True},
                                       {"positional_encoding": "alibi", "norm_first": True}])
def test_each_step_reproduces_the_next_and_the_model(tokenizer, overrides):
    model = _model(tokenizer, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    walk = explain(model, tokenizer, SOURCE, "two dogs play in the snow .")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert next(model.parameters()).dtype == torch.float32
    for kind in KINDS:
        for layer in range(2):
            for head in range(4):
                h = walk.head(kind, layer, head)
                assert h.query.dtype == torch.float64 and h.d_k == 8
                torch.testing.assert_close(h.scores, h.query @ h.key.T, rtol=0, atol=1e-12)
                torch.testing.assert_close(h.scaled, h.scores / math.sqrt(8), rtol=0, atol=1e-12)
                biased = h.scaled if h.bias is None else h.scaled + h.bias
                assert (h.bias is not None) == (overrides.get("positional_encoding") in ("alibi", "relative")
                                                and kind != "cross")
                masked = biased if h.mask is None else biased.masked_fill(~h.mask, -math.inf)
                torch.testing.assert_close(h.weights, torch.softmax(masked, -1), rtol=0, atol=1e-12)
                torch.testing.assert_close(h.output, h.weights @ h.value, rtol=0, atol=1e-12)
                if kind == "decoder":  # the look-ahead mask: row t sees keys 0..t
                    assert torch.equal(h.mask, torch.ones(len(h.query_tokens), len(h.key_tokens)).tril().bool())
                    assert float(h.weights.triu(1).abs().max()) == 0.0
    # The walk against the model's own forward pass (float64) and the float32 heatmaps.
    for name, difference in walk.differences.items():
        assert difference < (1e-5 if "float32" in name else 1e-12), (name, difference)
    # The printed next-piece probabilities are the model's.
    model64 = _model(tokenizer, **overrides).double()
    src = torch.tensor([tokenizer.encode(SOURCE)])
    tgt = torch.tensor([[2] + tokenizer.encode("two dogs play in the snow .")])
    with torch.no_grad():
        probabilities = torch.softmax(model64(src, tgt)[0], -1)
    top = probabilities.topk(5, dim=-1)
    for t, best in enumerate(walk.next_pieces):
        assert [piece for piece, _ in best] == tokenizer.pieces(top.indices[t].tolist())
        assert [p for _, p in best] == pytest.approx(top.values[t].tolist(), rel=0, abs=1e-12)


def test_default_target_is_the_translation_of_the_attention_maps(tokenizer):
    model = _model(tokenizer)
    maps = Translator(model, tokenizer).attention(SOURCE)
    walk = explain(model, tokenizer, SOURCE)
    assert (walk.translation, walk.target_tokens, walk.source_tokens) == (
        maps.translation, maps.target_tokens, maps.source_tokens)
    for layer in range(2):
        for head in range(4):
            torch.testing.assert_close(walk.head("cross", layer, head).weights.float(), maps.cross[layer, head],
                                       rtol=0, atol=1e-5)


def test_json_equals_the_model_on_a_padded_batch_with_a_neighbour(tokenizer, tmp_path):
    """The explained numbers are the ones the model computes when the sentence shares a padded
    batch with a longer neighbour (padding changes nothing)."""
    model = _model(tokenizer)
    target = "two dogs play in the snow ."
    walk = explain(model, tokenizer, SOURCE, target)
    model64 = _model(tokenizer).double()
    src_ids, neighbour = tokenizer.encode(SOURCE), tokenizer.encode(NEIGHBOUR)
    assert len(neighbour) > len(src_ids)
    src = torch.zeros(2, len(neighbour), dtype=torch.long)  # [2, S] right-padded with pad = 0
    src[0, : len(src_ids)], src[1] = torch.tensor(src_ids), torch.tensor(neighbour)
    tgt_ids = [2] + tokenizer.encode(target)
    other = [2] + tokenizer.encode("a man rides a bike across a long bridge .")
    tgt = torch.zeros(2, max(len(tgt_ids), len(other)), dtype=torch.long)
    tgt[0, : len(tgt_ids)], tgt[1, : len(other)] = torch.tensor(tgt_ids), torch.tensor(other)
    with torch.no_grad():
        encoded = model64.encode(src, need_weights=True)
        decoded = model64.decode(tgt, encoded, need_weights=True)
    S, T = len(src_ids), len(tgt_ids)
    batch = {"encoder": [w[0, :, :S, :S] for w in encoded.self_attention],
             "decoder": [w[0, :, :T, :T] for w in decoded.self_attention],
             "cross": [w[0, :, :T, :S] for w in decoded.cross_attention]}
    for kind in KINDS:
        for layer in range(2):
            for head in range(4):
                path = tmp_path / f"{kind}{layer}{head}.json"
                path.write_text(json.dumps(walk_json(walk, kind, layer, head)))
                document = json.loads(path.read_text())
                array = {name: torch.tensor(document[name], dtype=torch.float64)
                         for name in ("query", "key", "value", "scores", "scaled", "weights", "output")}
                weights = array["weights"]
                assert torch.allclose(weights, batch[kind][layer][head], rtol=0, atol=1e-12)
                # The JSON's arrays reproduce each other.
                q, k, v = array["query"], array["key"], array["value"]
                assert torch.allclose(array["scores"], q @ k.T, rtol=0, atol=1e-12)
                assert torch.allclose(array["scaled"], q @ k.T / math.sqrt(document["d_k"]), rtol=0, atol=1e-12)
                assert torch.allclose(array["output"], weights @ v, rtol=0, atol=1e-12)
                assert len(document["query_tokens"]) == weights.size(0)
                assert len(document["key_tokens"]) == weights.size(1)
                assert (document["mask"] is None) == (kind != "decoder")
    probabilities = torch.softmax(decoded.logits[0, :T], -1)
    assert float((probabilities - walk.probabilities).abs().max()) < 1e-12


def test_the_terminal_walk_names_every_step(tokenizer):
    walk = explain(_model(tokenizer), tokenizer, SOURCE, "two dogs play in the snow .")
    text = format_walk(walk, "decoder", -1, 3)
    for phrase in ("Q = X W^Q", "K = X W^K", "V = X W^V", "scores = Q K^T", "scaled = scores / sqrt(d_k)",
                   "look-ahead mask", "softmax of each row", "weights x V", "Concat(head_1 .. head_4)", "x W^O",
                   "Add & Norm", "max(0, x W1 + b1)", "softmax over the vocabulary",
                   f"[{len(walk.target_tokens)} x {len(walk.target_input_tokens)}]"):
        assert phrase in text, phrase
    assert "1. embedding" not in text  # layer 1: the input is layer 0's output
    first = format_walk(walk, "encoder", 0, 0)
    assert "1. embedding x sqrt(d_model)" in first and "2. positional encoding" in first
    with pytest.raises(ValueError, match="layer 2 out of range"):
        walk.head("cross", 2, 0)
    alibi = explain(_model(tokenizer, positional_encoding="alibi"), tokenizer, SOURCE, "two dogs .")
    text = format_walk(alibi, "encoder", 0, 1)
    assert "2. no position table: ALiBi" in text and "8b. + position bias (ALiBi" in text


def test_cli_explain_writes_json_and_html(tokenizer, tmp_path, capsys):
    model_dir = save_model(_model(tokenizer), tokenizer, tmp_path / "model")
    json_path, html_path = tmp_path / "walk.json", tmp_path / "walk.html"
    assert main(["explain", "--model", str(model_dir), SOURCE, "--kind", "cross", "--layer", "1", "--head", "2",
                 "--json", str(json_path), "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert "encoder-decoder attention, layer 1, head 2" in out
    document = json.loads(json_path.read_text())
    assert set(document) >= {"query", "key", "value", "scores", "scaled", "mask", "weights", "output",
                             "query_tokens", "key_tokens", "d_k"}
    page = html_path.read_text()
    assert "<script src" not in page and "http://" not in page and "https://" not in page  # works offline
    assert main(["explain", "--model", str(model_dir), SOURCE, "--head", "9"]) == 2
    assert "head 9 out of range" in capsys.readouterr().err


CHROMIUM = os.environ.get("AIAYN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
def test_html_page_selectors_switch_matrices_in_chromium(tokenizer, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    walk = explain(_model(tokenizer), tokenizer, SOURCE, "two dogs play in the snow .")
    page_path = tmp_path / "walk.html"
    write_html(walk, page_path)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                             "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_path.as_uri())
            for kind, layer, head in (("encoder", 0, 0), ("cross", 1, 2), ("decoder", 1, 3)):
                page.select_option("#explain-kind", kind)
                page.select_option("#explain-layer", str(layer))
                page.select_option("#explain-head", str(head))
                steps = page.locator("#explain-steps")
                assert (steps.get_attribute("data-kind"), steps.get_attribute("data-layer"),
                        steps.get_attribute("data-head")) == (kind, str(layer), str(head))
                # The softmax heatmap (step 10) shows this head's weights: hover titles carry values.
                expected = walk.head(kind, layer, head).weights
                cells = page.locator(".step").filter(has_text="10. softmax").locator("td")
                assert cells.count() == expected.numel()
                shown = [float(cells.nth(i).get_attribute("title").rsplit(": ", 1)[1]) for i in range(3)]
                assert shown == pytest.approx(expected.flatten()[:3].tolist(), abs=1e-4)
            assert page.locator("#explain-next tr").count() == len(walk.target_tokens)
            assert errors == []
        finally:
            browser.close()
