"""Plots of attention weights and positional encodings (PNG files).

The weights come from the model on request (`Transformer.encode/decode(..., need_weights=True)`,
or `Translator.attention`), never from state stashed on a module. Plotting needs matplotlib
(`pip install 'aiayn[viz]'`); it is imported inside the functions, so `import aiayn.visualize`
works without it. Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so the
caller's backend and pyplot state are left alone.

Shape legend: L layers, H heads, Q query positions (rows), K key positions (columns),
S source length, T target length, P positions, E d_model.

Token labels are SentencePiece pieces shown verbatim: "▁" marks the start of a word (a leading
space would be invisible on a tick label). Layers and heads are numbered from 0, as indexed.
Labels in scripts that DejaVu Sans (matplotlib's bundled font) lacks, e.g. Korean or Chinese, are
drawn with an installed font that has the glyphs (Debian: `fonts-nanum` or `fonts-noto-cjk`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from aiayn.files.atomic import atomic_write_bytes

if TYPE_CHECKING:  # the translator is only needed for type hints
    from aiayn.decoding.translator import AttentionResult

KINDS = ("cross", "encoder", "decoder")
DEFAULT_FONT = "DejaVu Sans"  # bundled with matplotlib: Latin (umlauts included), Greek, Cyrillic
# Tried first, in this order, for characters the default font lacks.
PREFERRED_FALLBACK_FONTS = (
    "Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC",
    "NanumGothic", "NanumBarunGothic", "Noto Sans", "Noto Sans Arabic", "Noto Sans Devanagari",
)


def require_matplotlib() -> Any:
    """The matplotlib package, or an ImportError that says how to install it."""
    try:
        import matplotlib
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        import matplotlib.font_manager
    except ImportError as error:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'aiayn[viz]'"
        ) from error
    return matplotlib


# --- fonts -------------------------------------------------------------------------------------


@functools.cache
def _charmap(font_file: str) -> frozenset[int]:
    """Code points that the font file has glyphs for (empty when it cannot be read)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(font_file).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def font_families(labels: Sequence[str]) -> list[str]:
    """Font families that together have a glyph for every character of `labels`.

    DejaVu Sans first; then, while characters are missing, the installed font covering most of
    them (preferring `PREFERRED_FALLBACK_FONTS`). matplotlib (>= 3.6) falls back along the list
    glyph by glyph. Warns when no installed font has some of the characters.
    """
    font_manager = require_matplotlib().font_manager
    needed = {ord(char) for label in labels for char in label if not char.isspace()}
    default_file = font_manager.findfont(DEFAULT_FONT, fallback_to_default=True)
    missing = needed - _charmap(default_file)
    families = [DEFAULT_FONT]
    if not missing:
        return families
    missing = _add_fallbacks(font_manager.fontManager, missing, families)
    if missing:
        # matplotlib's font list is cached on first use, so fonts installed since then (e.g. by
        # apt after the cache was built) are unknown to it: register them and look again.
        known = {entry.fname for entry in font_manager.fontManager.ttflist}
        for font_file in font_manager.findSystemFonts():
            if font_file not in known:
                try:
                    font_manager.fontManager.addfont(font_file)
                except (OSError, RuntimeError, ValueError):
                    continue
        missing = _add_fallbacks(font_manager.fontManager, missing, families)
    if missing:
        shown = "".join(sorted(chr(code) for code in missing))[:20]
        warnings.warn(
            f"no installed font has glyphs for {shown!r}; those labels will show boxes. Install a "
            "font for the script (Debian: apt-get install fonts-noto-cjk, or fonts-nanum for "
            "Korean) and delete matplotlib's font cache (~/.cache/matplotlib)",
            stacklevel=3,
        )
    return families


def _add_fallbacks(manager: Any, missing: set[int], families: list[str]) -> set[int]:
    """Append to `families` the fonts of `manager` that cover most of `missing`, greedily;
    return the code points still missing."""
    rank = {name: i for i, name in enumerate(PREFERRED_FALLBACK_FONTS)}
    candidates: dict[str, str] = {}  # family name -> a font file, regular weight preferred
    for entry in manager.ttflist:
        # matplotlib's "Last Resort" font maps every code point to a placeholder box: not a glyph.
        if entry.name in families or entry.style != "normal" or entry.name.startswith("Last Resort"):
            continue
        if entry.name not in candidates or entry.weight in (400, "normal", "regular"):
            candidates[entry.name] = entry.fname
    ordered = sorted(candidates, key=lambda name: (rank.get(name, len(rank)), name))
    while missing and ordered:
        best = max(ordered, key=lambda name: len(missing & _charmap(candidates[name])))  # first on ties
        covered = missing & _charmap(candidates[best])
        if not covered:
            break
        families.append(best)
        ordered.remove(best)
        missing = missing - covered
    return missing


# --- attention ---------------------------------------------------------------------------------


def _label_fontsize(count: int) -> float:
    """Smaller tick labels for longer sentences; still legible at 40+ subwords."""
    if count <= 12:
        return 10.0
    if count <= 25:
        return 9.0
    if count <= 45:
        return 8.0
    return 7.0


def _panel_inches(count: int, fontsize: float) -> float:
    """Panel side for `count` tokens: one text line (1.5 x font size) per token, at least 2 in."""
    return max(2.0, count * fontsize * 1.5 / 72)


def _wrap_to_width(title: str, figure, fontsize: float = 12.0) -> str:
    """Wrap each line of a figure title so that it fits the figure's width (a long translation
    would otherwise be cut off at both edges of a narrow figure)."""
    import textwrap

    chars = max(20, int(figure.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    return "\n".join(textwrap.fill(line, chars) for line in title.splitlines())


def attention_figsize(
    n_rows: int, n_cols: int, n_queries: int, n_keys: int, *, title: bool = True
) -> tuple[float, float]:
    """(width, height) in inches of an n_rows x n_cols grid of [Q, K] panels with tick labels.

    Each panel gets one text line per token, plus margins for the (rotated) tick labels, the panel
    titles and the shared colour bar.
    """
    fontsize = _label_fontsize(max(n_queries, n_keys))
    label_margin = 1.6  # room for subword tick labels (about 12 characters)
    width = n_cols * (_panel_inches(n_keys, fontsize) + 0.3) + label_margin + 1.2  # + colour bar
    height = n_rows * (_panel_inches(n_queries, fontsize) + 0.4) + label_margin + (0.5 if title else 0.0)
    return round(width, 1), round(height, 1)  # whole pixels at the usual dpi values


def _check_labels(weights: Tensor, row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    queries, keys = weights.shape[-2:]
    if len(row_labels) != queries or len(col_labels) != keys:
        raise ValueError(
            f"weights have {queries} rows x {keys} columns but got {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels"
        )


def _draw_grid(
    panels: list[list[Tensor]],
    panel_titles: list[list[str]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None,
    out: str | Path,
    dpi: int,
) -> Path:
    """Draw panels[r][c] ([Q, K] each) with one colour scale and bar; write a PNG to `out`."""
    mpl = require_matplotlib()
    n_rows, n_cols = len(panels), len(panels[0])
    n_queries, n_keys = len(row_labels), len(col_labels)
    fontsize = _label_fontsize(max(n_queries, n_keys))
    vmax = max(float(panel.max()) for row in panels for panel in row) or 1.0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context({"font.family": font_families([*row_labels, *col_labels, title or ""])}):
        figure = mpl.figure.Figure(
            figsize=attention_figsize(n_rows, n_cols, n_queries, n_keys, title=bool(title)),
            dpi=dpi, layout="constrained",
        )
        mpl.backends.backend_agg.FigureCanvasAgg(figure)
        axes = figure.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
        image = None
        for r in range(n_rows):
            for c in range(n_cols):
                ax = axes[r][c]
                image = ax.imshow(
                    panels[r][c].float().numpy(), cmap="viridis", vmin=0.0, vmax=vmax,
                    aspect="auto", interpolation="nearest",
                )
                ax.set_title(panel_titles[r][c], fontsize=fontsize + 1)
                # parse_math=False: a piece such as "$" must not switch on mathtext.
                ax.set_xticks(range(n_keys), col_labels, rotation=90, fontsize=fontsize, parse_math=False)
                ax.set_yticks(range(n_queries), row_labels, fontsize=fontsize, parse_math=False)
                ax.tick_params(labelbottom=r == n_rows - 1, labelleft=c == 0, length=2)
                if r == n_rows - 1:
                    ax.set_xlabel(xlabel)
                if c == 0:
                    ax.set_ylabel(ylabel)
        figure.colorbar(image, ax=axes.ravel().tolist(), label="attention weight", shrink=0.9)
        if title:
            figure.suptitle(_wrap_to_width(title, figure), parse_math=False)
        _save_png(figure, out, dpi)
    return out


def plot_attention(
    weights: Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    heads: str | int = "all",
    title: str | None = None,
    out: str | Path,
    xlabel: str = "key",
    ylabel: str = "query",
    dpi: int = 100,
) -> Path:
    """Heatmap(s) of one layer's attention weights, written as a PNG.

    Args:
        weights: [H, Q, K] (one layer, all heads) or [Q, K] (one head); row q holds the weights
            query q gives to each key.
        row_labels: Q query tokens; col_labels: K key tokens.
        heads: "all" (a grid of heads sharing one colour bar), an int (that head, 0-based,
            negative counts from the end) or "mean" (average over heads).
    Returns:
        The path written.
    Raises:
        ValueError: wrong tensor rank, labels not matching the shape, or a bad `heads`.
        ImportError: matplotlib is not installed.
    """
    weights = weights.detach().cpu()
    if weights.dim() == 2:
        weights = weights[None]  # [1, Q, K]
    if weights.dim() != 3:
        raise ValueError(f"weights must be [H, Q, K] or [Q, K], got shape {tuple(weights.shape)}")
    _check_labels(weights, row_labels, col_labels)
    n_heads = weights.size(0)
    if heads == "all":
        # Rows of up to 4 heads that fill the grid (8 heads: 2 x 4; 6: 2 x 3; a prime H: 1 row).
        n_cols = max(d for d in range(1, min(n_heads, 4) + 1) if n_heads % d == 0)
        n_cols = n_heads if n_cols == 1 else n_cols
        n_rows = n_heads // n_cols
        panels = [[weights[r * n_cols + c] for c in range(n_cols)] for r in range(n_rows)]
        titles = [[f"head {r * n_cols + c}" for c in range(n_cols)] for r in range(n_rows)]
    elif heads == "mean":
        panels, titles = [[weights.mean(0)]], [[f"mean of {n_heads} heads"]]
    elif isinstance(heads, int) and not isinstance(heads, bool):
        if not -n_heads <= heads < n_heads:
            raise ValueError(f"head {heads} out of range for {n_heads} heads")
        panels, titles = [[weights[heads]]], [[f"head {heads % n_heads}"]]
    else:
        raise ValueError(f"heads must be 'all', 'mean' or an int, got {heads!r}")
    if n_heads == 1 and heads == "all":
        titles = [[""]]
    return _draw_grid(
        panels, titles, row_labels, col_labels, xlabel=xlabel, ylabel=ylabel, title=title, out=out, dpi=dpi
    )


def _select_kind(result: AttentionResult, kind: str) -> tuple[Tensor, list[str], list[str], str, str, str]:
    """(weights [L, H, Q, K], row labels, column labels, x label, y label, name) of one kind."""
    if kind == "cross":
        return (result.cross, result.target_tokens, result.source_tokens, "source", "target",
                "encoder-decoder attention")
    if kind == "encoder":
        return (result.encoder_self, result.source_tokens, result.source_tokens, "source", "source",
                "encoder self-attention")
    if kind == "decoder":
        return (result.decoder_self, result.target_tokens, result.target_input_tokens, "target input",
                "target", "decoder self-attention")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def plot_attention_result(
    result: AttentionResult,
    *,
    kind: str = "cross",
    layer: int | str = -1,
    head: int | str = "all",
    out: str | Path,
    dpi: int = 100,
) -> Path:
    """Plot one kind of attention of a translated sentence (`Translator.attention`).

    Args:
        kind: "cross" (target rows x source columns), "encoder" (source x source) or
            "decoder" (target x "<s>" + target).
        layer: a layer index (0-based, -1 = last) or "all" (one row of panels per layer).
        head: a head index, "all" or "mean". layer="all" with head="all" is a layers x heads grid;
            with "mean" or an int, a layers x 1 column.
    Returns:
        The path written.
    Raises:
        ValueError: unknown kind, layer or head out of range.
        ImportError: matplotlib is not installed.
    """
    weights, rows, cols, xlabel, ylabel, name = _select_kind(result, kind)
    weights = weights.detach().cpu()  # [L, H, Q, K]
    n_layers, n_heads = weights.shape[:2]
    header = f"{name}: {result.translation}" if kind != "encoder" else name
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for {n_layers} layers")
        title = f"{header}\nlayer {layer % n_layers} of 0..{n_layers - 1}"
        return plot_attention(weights[layer], rows, cols, heads=head, title=title, out=out,
                              xlabel=xlabel, ylabel=ylabel, dpi=dpi)
    if layer != "all":
        raise ValueError(f"layer must be an int or 'all', got {layer!r}")
    if head == "all":
        panels = [[weights[i, h] for h in range(n_heads)] for i in range(n_layers)]
        titles = [[f"layer {i}, head {h}" for h in range(n_heads)] for i in range(n_layers)]
    elif head == "mean":
        panels = [[weights[i].mean(0)] for i in range(n_layers)]
        titles = [[f"layer {i}, mean of {n_heads} heads"] for i in range(n_layers)]
    elif isinstance(head, int) and not isinstance(head, bool):
        if not -n_heads <= head < n_heads:
            raise ValueError(f"head {head} out of range for {n_heads} heads")
        panels = [[weights[i, head]] for i in range(n_layers)]
        titles = [[f"layer {i}, head {head % n_heads}"] for i in range(n_layers)]
    else:
        raise ValueError(f"head must be 'all', 'mean' or an int, got {head!r}")
    _check_labels(weights, rows, cols)
    return _draw_grid(panels, titles, rows, cols, xlabel=xlabel, ylabel=ylabel, title=header,
                      out=out, dpi=dpi)


# --- positional encoding -----------------------------------------------------------------------


def position_similarity(table: Tensor) -> Tensor:
    """Cosine similarity between the encodings of every pair of positions: [P, E] -> [P, P].

    For the sinusoids every position has norm sqrt(E / 2), so this is the dot product scaled by
    2 / E; it depends on the distance between positions only (section 3.5's motivation).
    """
    unit = torch.nn.functional.normalize(table.double(), dim=-1)  # [P, E]
    return (unit @ unit.T).float()  # [P, P]


def plot_positional_encoding(
    table: Tensor,
    *,
    out: str | Path,
    similarity: bool = False,
    title: str | None = None,
    dpi: int = 100,
    first_row: int = 0,
    row_label: str = "position",
) -> Path:
    """Heatmap of a positional-encoding table (position x dimension), written as a PNG.

    Args:
        table: [P, E], e.g. `sinusoidal_table(100, 512)` or a model's learned `positions.weight`.
        similarity: add a second panel with the cosine similarity between positions [P, P].
        first_row, row_label: what row 0 stands for and the rows' name (Shaw et al.'s relative
            table: rows are the distances j - i from -k).
    Returns:
        The path written.
    Raises:
        ValueError: table is not 2-D or is empty.
        ImportError: matplotlib is not installed.
    """
    table = table.detach().float().cpu()
    if table.dim() != 2 or table.numel() == 0:
        raise ValueError(f"table must be a non-empty [positions, d_model] tensor, got {tuple(table.shape)}")
    mpl = require_matplotlib()
    n_positions, d_model = table.shape
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    height = min(max(4.0, n_positions * 0.06), 12.0)
    width = 9.0 + (height + 1.5 if similarity else 0.0)
    with mpl.rc_context({"font.family": [DEFAULT_FONT]}):
        figure = mpl.figure.Figure(figsize=(width, height + 0.8), dpi=dpi, layout="constrained")
        mpl.backends.backend_agg.FigureCanvasAgg(figure)
        if similarity:
            table_ax, sim_ax = figure.subplots(1, 2, width_ratios=[9.0, height + 1.5])
        else:
            table_ax, sim_ax = figure.subplots(1, 1), None
        limit = float(table.abs().max()) or 1.0
        extent = (-0.5, d_model - 0.5, first_row + n_positions - 0.5, first_row - 0.5)
        image = table_ax.imshow(table.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit,
                                aspect="auto", interpolation="nearest", extent=extent)
        table_ax.set(xlabel="dimension", ylabel=row_label, title=f"encoding [{n_positions} x {d_model}]")
        figure.colorbar(image, ax=table_ax, label="value")
        if sim_ax is not None:
            sim_extent = (first_row - 0.5, first_row + n_positions - 0.5) + extent[2:]
            image = sim_ax.imshow(position_similarity(table).numpy(), cmap="viridis", vmin=-1.0, vmax=1.0,
                                  interpolation="nearest", extent=sim_extent)
            sim_ax.set(xlabel=row_label, ylabel=row_label, title="cosine similarity")
            figure.colorbar(image, ax=sim_ax)
        if title:
            figure.suptitle(_wrap_to_width(title, figure), parse_math=False)
        _save_png(figure, out, dpi)
    return out


def plot_position_bias(bias: Tensor, *, out: str | Path, title: str | None = None, dpi: int = 100) -> Path:
    """One heatmap per head of an additive score bias (ALiBi's -m_h |i - j|), written as a PNG.

    Args:
        bias: [H, L, M], query position x key position, e.g. `attention.alibi_bias(...)`.
    Returns:
        The path written.
    Raises:
        ValueError: bias is not 3-D or is empty.
        ImportError: matplotlib is not installed.
    """
    bias = bias.detach().float().cpu()
    if bias.dim() != 3 or bias.numel() == 0:
        raise ValueError(f"bias must be a non-empty [heads, queries, keys] tensor, got {tuple(bias.shape)}")
    mpl = require_matplotlib()
    n_heads = bias.size(0)
    n_cols = min(n_heads, 4)
    n_rows = -(-n_heads // n_cols)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    low = float(bias.min()) or -1.0
    with mpl.rc_context({"font.family": [DEFAULT_FONT]}):
        figure = mpl.figure.Figure(figsize=(3.2 * n_cols + 1.0, 3.0 * n_rows + 0.8), dpi=dpi, layout="constrained")
        mpl.backends.backend_agg.FigureCanvasAgg(figure)
        axes = figure.subplots(n_rows, n_cols, squeeze=False)
        image = None
        for head in range(n_rows * n_cols):
            ax = axes[head // n_cols][head % n_cols]
            if head >= n_heads:
                ax.set_axis_off()
                continue
            image = ax.imshow(bias[head].numpy(), cmap="viridis", vmin=low, vmax=0.0, interpolation="nearest")
            ax.set(title=f"head {head}", xlabel="key position j", ylabel="query position i")
        figure.colorbar(image, ax=axes, label="bias added to the score")
        if title:
            figure.suptitle(_wrap_to_width(title, figure), parse_math=False)
        _save_png(figure, out, dpi)
    return out


__all__ = [
    "KINDS", "attention_figsize", "font_families", "plot_attention", "plot_attention_result",
    "plot_position_bias", "plot_positional_encoding", "position_similarity", "require_matplotlib",
]


def _save_png(figure, path: str | Path, dpi: float | None = None) -> None:
    """Render `figure` to PNG in memory, then write it whole (a full disk: one DiskFullError)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi if dpi is not None else figure.dpi, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot_curves(log_path: str | Path, png_path: str | Path) -> Path | None:
    """A run's training loss, validation loss and validation BLEU from its log.jsonl, as a PNG:
    against training compute (TFLOP, `aiayn.training.compute`) where the log records it, else against
    updates. Without matplotlib, says so and returns None (a run's curves are optional)."""
    import json

    try:
        mpl = require_matplotlib()
    except ImportError as error:
        print(f"{error}: no {Path(png_path).name}", flush=True)
        return None
    records = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    axis = "tflop" if records and all("tflop" in r for r in records) else "step"
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    bleu = [r for r in records if "valid_bleu" in r]
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context({"font.family": [DEFAULT_FONT]}):
        figure = mpl.figure.Figure(figsize=(11, 4), dpi=100, layout="constrained")
        mpl.backends.backend_agg.FigureCanvasAgg(figure)
        ax_loss, ax_bleu = figure.subplots(1, 2)
        ax_loss.plot([r[axis] for r in train], [r["loss"] for r in train], label="train (smoothed)")
        ax_loss.plot([r[axis] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation (smoothed)")
        ax_loss.set(xlabel="training compute (TFLOP)" if axis == "tflop" else "update", ylabel="loss (nats / token)")
        ax_loss.legend()
        ax_bleu.plot([r[axis] for r in bleu], [r["valid_bleu"] for r in bleu], "o-", color="tab:green")
        ax_bleu.set(xlabel=ax_loss.get_xlabel(), ylabel="validation BLEU")
        _save_png(figure, png_path)
    return png_path
