"""Corpus-level BLEU, chrF and TER with sacreBLEU (Post, 2018), on detokenized text.

The paper reports tokenized BLEU (multi-bleu on its own tokenization); sacreBLEU's default 13a
tokenization with its signature is the reproducible choice for comparing systems today, so every
score comes with the signature that produced it.
"""

from __future__ import annotations

from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER


def _check(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references differ in length: {len(hypotheses)} hypotheses, "
            f"{len(references)} references"
        )
    if not hypotheses:
        raise ValueError("no sentences to score: hypotheses and references are empty")


def bleu(hypotheses: list[str], references: list[str], *, lowercase: bool = False) -> float:
    """Corpus BLEU (0-100) with sacreBLEU defaults (13a tokenization, exp smoothing).

    Raises:
        ValueError: different numbers of hypotheses and references (both counts named), or none.
    """
    _check(hypotheses, references)
    return BLEU(lowercase=lowercase).corpus_score(list(hypotheses), [list(references)]).score


def score(hypotheses: list[str], references: list[str], *, lowercase: bool = False) -> dict[str, Any]:
    """BLEU, chrF and TER of aligned hypothesis / reference lists (one reference per sentence).

    Returns:
        {"sentences", "bleu", "bleu_signature", "bleu_precisions" (1- to 4-gram, %),
        "bleu_brevity_penalty", "hyp_length", "ref_length", "chrf", "chrf_signature",
        "ter", "ter_signature"}, plus "bleu_lowercase" and "bleu_lowercase_signature" with
        lowercase=True. TER is sacreBLEU's default, which is case-insensitive.
    Raises:
        ValueError: different numbers of hypotheses and references (both counts named), or none.
    """
    _check(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    bleu_metric, chrf_metric, ter_metric = BLEU(), CHRF(), TER()
    bleu_score = bleu_metric.corpus_score(hyps, refs)
    chrf_score = chrf_metric.corpus_score(hyps, refs)
    ter_score = ter_metric.corpus_score(hyps, refs)
    result: dict[str, Any] = {
        "sentences": len(hyps),
        "bleu": bleu_score.score,
        "bleu_signature": str(bleu_metric.get_signature()),
        "bleu_precisions": list(bleu_score.precisions),
        "bleu_brevity_penalty": bleu_score.bp,
        "hyp_length": bleu_score.sys_len,
        "ref_length": bleu_score.ref_len,
        "chrf": chrf_score.score,
        "chrf_signature": str(chrf_metric.get_signature()),
        "ter": ter_score.score,
        "ter_signature": str(ter_metric.get_signature()),
    }
    if lowercase:
        lower_metric = BLEU(lowercase=True)
        result["bleu_lowercase"] = lower_metric.corpus_score(hyps, refs).score
        result["bleu_lowercase_signature"] = str(lower_metric.get_signature())
    return result


def format_scores(scores: dict[str, Any]) -> str:
    """Human-readable lines, one metric each, with its sacreBLEU signature."""
    precisions = "/".join(f"{p:.1f}" for p in scores["bleu_precisions"])
    ratio = scores["hyp_length"] / max(scores["ref_length"], 1)
    lines = [
        (
            f"BLEU = {scores['bleu']:.2f} {precisions} (BP = {scores['bleu_brevity_penalty']:.3f} "
            f"ratio = {ratio:.3f} hyp_len = {scores['hyp_length']} ref_len = {scores['ref_length']})  "
            f"{scores['bleu_signature']}"
        ),
    ]
    if "bleu_lowercase" in scores:
        lines.append(f"BLEU (lowercased) = {scores['bleu_lowercase']:.2f}  {scores['bleu_lowercase_signature']}")
    lines.append(f"chrF = {scores['chrf']:.2f}  {scores['chrf_signature']}")
    lines.append(f"TER = {scores['ter']:.2f}  {scores['ter_signature']}")
    lines.append(f"sentences = {scores['sentences']}")
    return "\n".join(lines)


__all__ = ["bleu", "format_scores", "score"]
