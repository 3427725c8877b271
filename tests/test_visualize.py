"""Attention and positional-encoding plots: the weights behind them, PNG sizes, fonts, the CLI."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib", reason="plots need the viz extra: pip install 'aiayn[viz]'")
import matplotlib.image

from aiayn import ModelConfig, Transformer
from aiayn.cli import main
from aiayn.config import DecodeConfig
from aiayn.model.transformer import sinusoidal_table
from aiayn.files.tokenizer import Tokenizer
from aiayn.files.checkpoint import load_model, save_model
from aiayn.visualize import (
    attention_figsize,
    font_families,
    plot_attention,
    plot_attention_result,
    plot_positional_encoding,
    position_similarity,
)

SOURCE = "Ein kleines Mädchen läuft über die Straße."
TARGET = "A little girl runs across the street."
DPI = 50  # small PNGs keep the tests fast; sizes scale linearly


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """A saved, untrained tiny model with a 300-piece joint vocabulary (De + En)."""
    tokenizer = tiny_tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("model"), {"src_lang": "de", "tgt_lang": "en"})


@pytest.fixture(scope="module")
def result(model_dir: Path):
    from aiayn.decoding.translator import Translator

    return Translator.load(model_dir).attention(SOURCE, TARGET)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG read back from disk."""
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def _expected_pixels(figsize: tuple[float, float], dpi: int) -> tuple[int, int]:
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


def _missing_glyph_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(r.message) for r in records if "missing from font" in str(r.message)]


# --- the weights in an AttentionResult -----------------------------------------------------------


def test_attention_result_tokens_shapes_and_rows(model_dir: Path, result) -> None:
    _, tokenizer, _ = load_model(model_dir)
    source_pieces = tokenizer.pieces(tokenizer.encode(SOURCE))
    target_pieces = tokenizer.pieces(tokenizer.encode(TARGET))
    assert result.source_tokens == source_pieces
    assert result.target_input_tokens == ["<s>", *target_pieces]
    assert result.target_tokens == [*target_pieces, "</s>"]
    S, T = len(source_pieces), len(target_pieces) + 1
    assert result.encoder_self.shape == (2, 4, S, S)
    assert result.decoder_self.shape == (2, 4, T, T)
    assert result.cross.shape == (2, 4, T, S)
    for weights in (result.encoder_self, result.decoder_self, result.cross):
        assert weights.dtype == torch.float32 and weights.device.type == "cpu"
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
        assert bool((weights >= 0).all())
    # Decoder self-attention: query t may not see target inputs after t, exactly.
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert bool((result.decoder_self[..., future] == 0).all())
    assert bool((result.decoder_self[..., ~future] > 0).all())


def test_attention_result_equals_model_weights_inside_a_padded_batch(model_dir: Path, result) -> None:
    """The same sentence next to a longer one (so right-padded): same weights, 0 on the padding."""
    model, tokenizer, _ = load_model(model_dir)
    src = tokenizer.encode(SOURCE)
    longer = tokenizer.encode(SOURCE + " " + SOURCE)
    tgt_in = [model.config.bos_id, *tokenizer.encode(TARGET)]
    pad = model.config.pad_id
    src_batch = torch.tensor([src + [pad] * (len(longer) - len(src)), longer])  # [2, S_max]
    tgt_batch = torch.tensor([tgt_in + [pad] * 3, tgt_in + [5, 6, 7]])  # [2, T + 3]
    S, T = len(src), len(tgt_in)
    with torch.no_grad():
        encoded = model.encode(src_batch, need_weights=True)
        decoded = model.decode(tgt_batch, encoded, need_weights=True)
    encoder_self = torch.stack(encoded.self_attention)[:, 0]  # [L, H, S_max, S_max]
    cross = torch.stack(decoded.cross_attention)[:, 0]  # [L, H, T + 3, S_max]
    decoder_self = torch.stack(decoded.self_attention)[:, 0]  # [L, H, T + 3, T + 3]
    assert bool((encoder_self[..., S:] == 0).all()) and bool((cross[..., S:] == 0).all())
    assert bool((decoder_self[..., T:] == 0).all())
    torch.testing.assert_close(result.encoder_self, encoder_self[:, :, :S, :S], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.cross, cross[:, :, :T, :S], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.decoder_self, decoder_self[:, :, :T, :T], atol=1e-5, rtol=1e-4)


def test_attention_without_target_uses_the_beam_translation(model_dir: Path) -> None:
    from aiayn.decoding.translator import Translator

    translator = Translator.load(model_dir)
    source = "Zwei Hunde spielen."
    own = translator.attention(source)
    assert own.translation == translator.translate([source], DecodeConfig(beam_size=4))[0]
    assert own.target_tokens[-1] == "</s>" and own.target_input_tokens[0] == "<s>"
    assert own.cross.shape[2] == len(own.target_tokens)
    assert torch.allclose(own.cross.sum(-1), torch.ones(own.cross.shape[:-1]), atol=1e-5)


# --- attention plots -----------------------------------------------------------------------------


def _random_weights(heads: int, queries: int, keys: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(heads, queries, keys, generator=generator), dim=-1)


@pytest.mark.slow
def test_plot_attention_pixel_size_and_readable_cells(tmp_path: Path) -> None:
    """40 subwords per axis: the PNG has the intended size and each token row / column gets at
    least one line of its label font (no bbox cropping, no squeezing)."""
    rows = [f"▁Wort{i}" for i in range(40)]
    cols = [f"▁word{i}" for i in range(40)]
    path = plot_attention(_random_weights(8, 40, 40), rows, cols, out=tmp_path / "grid.png", dpi=DPI)
    figsize = attention_figsize(2, 4, 40, 40, title=False)
    assert _png_size(path) == _expected_pixels(figsize, DPI)
    fontsize_points = 8.0  # what 40 labels get
    assert figsize[0] / 4 / 40 * 72 >= 1.2 * fontsize_points  # inches per column, in points
    assert figsize[1] / 2 / 40 * 72 >= 1.2 * fontsize_points
    # More tokens, bigger figure; one head or the mean is a single panel.
    assert attention_figsize(1, 1, 40, 40)[0] > attention_figsize(1, 1, 10, 10)[0]
    for heads in (3, "mean"):
        single = plot_attention(_random_weights(8, 5, 7), rows[:5], cols[:7], heads=heads,
                                out=tmp_path / f"{heads}.png", dpi=DPI)
        assert _png_size(single) == _expected_pixels(attention_figsize(1, 1, 5, 7, title=False), DPI)


@pytest.mark.parametrize(
    "weights, heads, message",
    [
        (_random_weights(4, 5, 6)[0, 0], "all", "must be"),  # 1-D
        (_random_weights(4, 5, 7), "all", "labels"),  # 7 columns, 6 labels
        (_random_weights(4, 5, 6), 4, "out of range"),
        (_random_weights(4, 5, 6), "max", "heads must be"),
    ],
)
def test_plot_attention_rejects_bad_input(tmp_path: Path, weights, heads, message) -> None:
    with pytest.raises(ValueError, match=message):
        plot_attention(weights, list("abcde"), list("abcdef"), heads=heads, out=tmp_path / "x.png")


@pytest.mark.parametrize(
    "kind, layer, head, grid",
    [("cross", -1, "all", (1, 4)), ("encoder", "all", "all", (2, 4)), ("decoder", "all", "mean", (2, 1)),
     ("cross", 0, 2, (1, 1))],
)
def test_plot_attention_result_layouts(tmp_path: Path, result, kind, layer, head, grid) -> None:
    rows = {"cross": result.target_tokens, "encoder": result.source_tokens, "decoder": result.target_tokens}[kind]
    cols = {"cross": result.source_tokens, "encoder": result.source_tokens,
            "decoder": result.target_input_tokens}[kind]
    path = plot_attention_result(result, kind=kind, layer=layer, head=head, out=tmp_path / "r.png", dpi=DPI)
    assert _png_size(path) == _expected_pixels(attention_figsize(*grid, len(rows), len(cols)), DPI)


def test_plot_attention_result_rejects_bad_choices(tmp_path: Path, result) -> None:
    with pytest.raises(ValueError, match="kind"):
        plot_attention_result(result, kind="self", out=tmp_path / "x.png")
    with pytest.raises(ValueError, match="layer 2 out of range"):
        plot_attention_result(result, layer=2, out=tmp_path / "x.png")
    with pytest.raises(ValueError, match="head 9 out of range"):
        plot_attention_result(result, layer="all", head=9, out=tmp_path / "x.png")


# --- fonts ---------------------------------------------------------------------------------------


def _render_labels(labels: list[str], tmp_path: Path) -> list[str]:
    weights = _random_weights(1, len(labels), len(labels))[0]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        plot_attention(weights, labels, labels, title=" ".join(labels), out=tmp_path / "glyphs.png", dpi=DPI)
    return _missing_glyph_warnings(records)


def test_umlauts_render_without_missing_glyphs(tmp_path: Path) -> None:
    labels = ["▁Mädchen", "▁läuft", "▁über", "▁Straße", "▁ÄÖÜ", "</s>"]
    assert font_families(labels) == ["DejaVu Sans"]
    assert _render_labels(labels, tmp_path) == []


def test_korean_renders_with_an_installed_cjk_font(tmp_path: Path) -> None:
    labels = ["▁작은", "▁소녀가", "▁길을", "▁건넌다", "."]
    # Control: matplotlib's own default font lacks Hangul, so the warning check can fail.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        figure = Figure(figsize=(2, 1))
        FigureCanvasAgg(figure)
        figure.text(0.1, 0.5, labels[1], family="DejaVu Sans")
        figure.savefig(io.BytesIO(), format="png")
    assert _missing_glyph_warnings(records), "DejaVu Sans unexpectedly has Hangul"

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        families = font_families(labels)
    if any("no installed font" in str(r.message) for r in records):
        pytest.skip("no font with Hangul installed (Debian: apt-get install fonts-nanum or fonts-noto-cjk)")
    assert families[0] == "DejaVu Sans" and len(families) >= 2
    assert _render_labels(labels, tmp_path) == []


def test_characters_no_font_has_give_one_clear_warning() -> None:
    with pytest.warns(UserWarning, match="no installed font has glyphs"):
        assert font_families(["\U0010fffd"]) == ["DejaVu Sans"]


# --- positional encoding -------------------------------------------------------------------------


def test_sinusoid_similarity_depends_on_distance_only() -> None:
    table = sinusoidal_table(60, 64)
    similarity = position_similarity(table)  # [60, 60]
    torch.testing.assert_close(similarity, table @ table.T * 2 / 64, atol=1e-5, rtol=0)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(60))
    for distance in (1, 7, 30):
        band = similarity.diagonal(distance)
        torch.testing.assert_close(band, band[:1].expand_as(band), atol=1e-5, rtol=0)
    assert similarity[0, 1] > similarity[0, 30]  # nearby positions are more alike


def test_plot_positional_encoding(tmp_path: Path) -> None:
    table = sinusoidal_table(100, 512)
    plain = plot_positional_encoding(table, out=tmp_path / "pe.png", dpi=DPI)
    both = plot_positional_encoding(table, out=tmp_path / "pe_sim.png", similarity=True, dpi=DPI)
    assert _png_size(plain) == (9 * DPI, round(6.8 * DPI))
    assert _png_size(both)[0] == round((9 + 6 + 1.5) * DPI) and _png_size(both)[1] == _png_size(plain)[1]
    pixels = matplotlib.image.imread(plain)[..., :3]
    assert pixels.std() > 0.1  # a heatmap, not a blank canvas
    with pytest.raises(ValueError, match="positions, d_model"):
        plot_positional_encoding(table[0], out=tmp_path / "bad.png")


# --- missing matplotlib, CLI ---------------------------------------------------------------------


def test_missing_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"pip install 'aiayn\[viz\]'"):
        plot_attention(_random_weights(2, 3, 3), list("abc"), list("abc"), out=tmp_path / "x.png")
    assert main(["positions", "--d-model", "16", "--length", "5", "--out", str(tmp_path / "p.png")]) == 2
    assert "aiayn[viz]" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_cli_attention_all_kinds(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "att.png"
    argv = ["attention", "--model", str(model_dir), SOURCE, "--target", TARGET, "--out", str(out),
            "--kind", "all", "--layer", "all", "--head", "mean", "--dpi", str(DPI)]
    assert main(argv) == 0
    written = [tmp_path / f"att.{kind}.png" for kind in ("cross", "encoder", "decoder")]
    assert capsys.readouterr().out.split() == [str(path) for path in written]
    for path in written:
        assert _png_size(path)[1] >= 2 * 2 * DPI  # two layer rows of at least 2 inches each
    with pytest.raises(SystemExit) as bad_head:  # argparse rejects it before any work
        main(["attention", "--model", str(model_dir), SOURCE, "--out", str(out), "--head", "first"])
    assert bad_head.value.code == 2
    assert "expected an integer or one of ('all', 'mean')" in capsys.readouterr().err


def test_cli_positions(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pe.png"
    assert main(["positions", "--d-model", "64", "--length", "50", "--out", str(out), "--similarity",
                 "--dpi", str(DPI)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _png_size(out) == (round(14.5 * DPI), round(4.8 * DPI))  # 50 positions: 4 in high
    from_model = tmp_path / "model_pe.png"
    assert main(["positions", "--model", str(model_dir), "--length", "30", "--out", str(from_model),
                 "--dpi", str(DPI)]) == 0
    assert _png_size(from_model) == (9 * DPI, round(4.8 * DPI))
    assert main(["positions", "--model", str(model_dir), "--length", "5000", "--out", str(out)]) == 2
    assert "max_positions" in capsys.readouterr().err
