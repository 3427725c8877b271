"""Greedy and beam search against numbers: cached == uncached, batch == single, scripted tables."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch

import aiayn.decoding.search
from aiayn import Transformer
from aiayn.inference import fused_beam_step
from aiayn.inference.beam_step import block_beam_step
from aiayn.decoding.search import Hypothesis, beam_search, beam_step, greedy_search, length_penalty
from conftest import tiny_model

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def model() -> Transformer:
    # A random model with tied embeddings just repeats one token (its own embedding scores
    # highest), which would hide a broken cache. Untied, with a sharper output layer and a
    # stronger EOS row, this one produces varied tokens and stops at varied lengths (some at the
    # maximum, some earlier), so the tests below exercise both ways a hypothesis ends.
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.output_projection.weight.mul_(2.0)
        model.output_projection.weight[EOS].mul_(1.5)
    return model


@pytest.fixture(params=["fused", "blocks", "torch"])
def beam_path(request, monkeypatch):
    """Beam search through each step `aiayn.inference.beam_step_for` can hand it (the fused C++
    step; log_softmax + block_beam_step) and through its own log_softmax + beam_step."""
    # Every beam_search call below without a step= gets the one of this parameter as its default.
    if request.param == "fused":
        if not fused_beam_step.available():
            pytest.skip("the fused beam step could not be built here (no C++ compiler torch.compile can use)")
        monkeypatch.setattr(aiayn.decoding.search, "log_prob_step", fused_beam_step.fused_beam_step)
    elif request.param == "blocks":
        blocks = functools.partial(aiayn.decoding.search.log_prob_step, select=block_beam_step)
        monkeypatch.setattr(aiayn.decoding.search, "log_prob_step", blocks)
    return request.param


def sources(lengths, seed=1, vocab=40) -> torch.Tensor:
    """Right-padded random sources [B, max(lengths)] with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for row, length in enumerate(lengths):
        batch[row, :length] = torch.randint(4, vocab, (length,), generator=generator)
    return batch


def uncached_greedy(model, src, max_len):
    """Reference: recompute the whole prefix every step, one sentence at a time."""
    encoder_out = model.encode(src)
    tokens = [BOS]
    with torch.no_grad():
        while len(tokens) - 1 < max_len:
            logits = model.decode(torch.tensor([tokens]), encoder_out).logits[0, -1].float()
            logits[[PAD, BOS]] = float("-inf")
            token = int(logits.argmax())
            if token == EOS:
                break
            tokens.append(token)
    return tokens[1:]


# --- length penalty and beam_step ---------------------------------------------------------------


def test_length_penalty_values():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0**0.6)  # (5+7)/6 = 2
    assert length_penalty(13, 1.0) == pytest.approx(3.0)
    assert length_penalty(19, 0.5) == pytest.approx(2.0)  # sqrt(24/6)
    assert length_penalty(10, 0.0) == 1.0


def test_beam_step_keeps_2k_candidates_sorted():
    scores = torch.tensor([[-1.0, -2.0]])  # [B=1, K=2]
    step = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]]))  # [1, 2, V=3]
    cand_scores, beams, tokens = beam_step(scores, step)
    total = scores[0, :, None] + step[0]
    expected = sorted(((float(total[b, t]), b, t) for b in range(2) for t in range(3)), reverse=True)[:4]
    assert cand_scores.shape == (1, 4)
    assert torch.allclose(cand_scores[0], torch.tensor([e[0] for e in expected]))
    assert beams[0].tolist() == [e[1] for e in expected]
    assert tokens[0].tolist() == [e[2] for e in expected]
    with pytest.raises(ValueError, match="beam_step"):
        beam_step(scores, step[:, :1])


def test_beam_step_equals_one_topk_over_all_sums():
    """beam_step and its block-maxima equivalent (blocks of 8 tokens: 6 whole blocks and a partial
    one per beam) == brute force over all K * V sums, including empty beam slots (-inf) and a beam
    whose best tokens all beat the other beams'."""
    generator = torch.Generator().manual_seed(3)
    batch, beam, vocab = 5, 4, 50
    scores = torch.randn(batch, beam, generator=generator) * 3
    scores[0, 1:] = float("-inf")  # first step: only slot 0 live
    step = torch.log_softmax(torch.randn(batch, beam, vocab, generator=generator) * 2, dim=-1)
    scores[1] = 0.0
    step[1, 2] += 5.0  # beam 2's 2K best tokens beat every token of the other beams of sentence 1
    brute_scores, brute_index = (scores[:, :, None] + step).view(batch, -1).topk(2 * beam, dim=-1)
    for select in (beam_step, lambda s, p: block_beam_step(s, p, block=8), block_beam_step):  # 64: one topk
        cand_scores, beams, tokens = select(scores, step)
        assert torch.equal(cand_scores, brute_scores)
        assert torch.equal(beams, brute_index // vocab)
        assert torch.equal(tokens, brute_index % vocab)
        assert beams[1].tolist() == [2] * (2 * beam)


@pytest.mark.parametrize("vocab", [8000, 8003])  # whole blocks of 64, a partial last block
def test_beam_step_by_blocks_equals_brute_force(vocab):
    """Large vocabularies go through the block maxima: the same 2K candidates as one top-k over
    all K * V sums, in the same order, with the best sums placed where blocks are easy to miss."""
    generator = torch.Generator().manual_seed(vocab)
    batch, beam = 4, 4
    scores = torch.randn(batch, beam, generator=generator)
    step = torch.log_softmax(torch.randn(batch, beam, vocab, generator=generator), dim=-1)
    scores[0, 1:] = float("-inf")  # first step: only slot 0 live
    step[1, 2, -1] = 0.0  # the best sum of sentence 1 sits in beam 2's partial last block
    step[2, 1, 64:128] += 30.0  # all 2K best sums of sentence 2 in one block of beam 1
    step[3, 3, 7] = float("-inf")
    cand_scores, beams, tokens = block_beam_step(scores, step)
    brute_scores, brute_index = (scores[:, :, None] + step).view(batch, -1).topk(2 * beam, dim=-1)
    assert torch.equal(cand_scores, brute_scores)
    assert torch.equal(beams, brute_index // vocab) and torch.equal(tokens, brute_index % vocab)
    assert (beams[1, 0].item(), tokens[1, 0].item()) == (2, vocab - 1)
    assert beams[2].tolist() == [1] * (2 * beam) and all(64 <= t < 128 for t in tokens[2].tolist())
    # An expanded input (the first beam step: one row per sentence, copied to every beam slot).
    wide = step[:, :1].expand(-1, beam, -1)
    brute_wide = (scores[:, :, None] + wide).reshape(batch, -1).topk(2 * beam, dim=-1)
    assert torch.equal(block_beam_step(scores, wide)[0], brute_wide.values)


NEEDS_FUSED = pytest.mark.skipif(
    not fused_beam_step.available(), reason="the fused beam step could not be built here (no C++ compiler)")


@NEEDS_FUSED
@pytest.mark.parametrize("vocab", [40, 8003])
@pytest.mark.parametrize("rows_per_sentence", [1, 4])
def test_fused_beam_step_equals_log_softmax_and_beam_step(vocab, rows_per_sentence):
    """The C++ step == float64 log_softmax, the pad / bos / maximum-length masks and beam_step:
    the same candidates in the same order, scores within float32 rounding."""
    generator = torch.Generator().manual_seed(vocab + rows_per_sentence)
    sentences, beam = 5, 4
    rows = sentences * rows_per_sentence
    scores = torch.randn(sentences, beam, generator=generator) * 3
    if rows_per_sentence == 1:
        scores[:, 1:] = float("-inf")  # the first step: only slot 0 live
    else:
        scores[2, 3] = float("-inf")  # an empty slot
    logits = torch.randn(rows, vocab, generator=generator) * 4
    logits[0, PAD] = logits[0, BOS] = 50.0  # the best logits of the row, but never generated
    at_max = torch.zeros(rows, dtype=torch.bool)
    at_max[rows_per_sentence : 2 * rows_per_sentence] = True  # sentence 1 may only end
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    log_probs[:, [PAD, BOS]] = float("-inf")
    eos_column = log_probs[:, EOS].clone()
    log_probs[at_max] = float("-inf")
    log_probs[:, EOS] = eos_column
    wide = log_probs.view(sentences, rows_per_sentence, vocab).expand(-1, beam, -1)
    expected = beam_step(scores.double(), wide)
    got = fused_beam_step.fused_beam_step(scores, logits, at_max, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    finite = expected[0] > float("-inf")
    assert torch.equal(got[0] > float("-inf"), finite)
    assert finite[1].sum() == (beam if rows_per_sentence > 1 else 1)  # EOS after each live beam
    assert torch.equal(got[1][finite], expected[1][finite]) and torch.equal(got[2][finite], expected[2][finite])
    assert torch.allclose(got[0][finite].double(), expected[0][finite], rtol=0, atol=1e-5)
    assert torch.all(got[2][~finite] == PAD)


@NEEDS_FUSED
def test_fused_beam_step_ties_and_errors():
    # Uniform logits: every continuation ties, and they come out in (beam, token) order.
    cand_scores, beams, tokens = fused_beam_step.fused_beam_step(
        torch.zeros(1, 2), torch.zeros(2, 10), None, pad_id=PAD, bos_id=BOS, eos_id=EOS
    )
    assert beams.tolist() == [[0, 0, 0, 0]] and tokens.tolist() == [[UNK, EOS, 4, 5]]
    assert torch.allclose(cand_scores, torch.full((1, 4), -math.log(10)))
    with pytest.raises(ValueError, match="do not fit"):
        fused_beam_step.fused_beam_step(torch.zeros(2, 2), torch.zeros(3, 10), None, pad_id=0, bos_id=2, eos_id=3)
    with pytest.raises(ValueError, match="float32"):
        fused_beam_step.fused_beam_step(
            torch.zeros(1, 2), torch.zeros(2, 10).double(), None, pad_id=0, bos_id=2, eos_id=3
        )


# --- the real model -----------------------------------------------------------------------------


def test_greedy_cached_equals_uncached(model):
    src = sources([7, 4, 9], seed=4)
    out = greedy_search(model, src, max_len_a=1.0, max_len_b=10)
    # Row 0 stops by EOS, rows 1 and 2 at their max lengths 4 + 10 and 9 + 10; tokens vary.
    assert [len(o) for o in out] == [7, 14, 19]
    assert len({token for row in out for token in row}) >= 8
    for row, length in enumerate([7, 4, 9]):
        expected = uncached_greedy(model, src[row : row + 1, :length], length + 10)
        assert out[row] == expected


def test_greedy_batch_equals_single(model):
    lengths = [3, 11, 6, 1, 8]
    src = sources(lengths, seed=2)
    batched = greedy_search(model, src, max_len_b=8)
    singles = [greedy_search(model, src[i : i + 1, :n], max_len_b=8)[0] for i, n in enumerate(lengths)]
    assert batched == singles


def test_greedy_max_length(model):
    src = sources([5, 2], seed=3)
    out = greedy_search(model, src, max_len_a=0.0, max_len_b=3)
    assert all(len(o) <= 3 for o in out)
    assert greedy_search(model, src, max_len_a=0.0, max_len_b=0) == [[], []]
    long = greedy_search(model, src, max_len_a=2.0, max_len_b=1000)  # capped at max_positions - 1
    assert all(len(o) <= model.config.max_positions - 1 for o in long)
    assert all(PAD not in o and BOS not in o and EOS not in o for o in out + long)


def test_beam_one_equals_greedy(model, beam_path):
    src = sources([6, 2, 10, 4], seed=4)
    greedy = greedy_search(model, src, max_len_b=12)
    beam = beam_search(model, src, beam_size=1, max_len_b=12)
    assert [hyps[0].tokens for hyps in beam] == greedy


def test_beam_batch_equals_single(model, beam_path):
    lengths = [5, 12, 2, 8]
    src = sources(lengths, seed=5)
    batched = beam_search(model, src, beam_size=4, max_len_b=10, nbest=3)
    lengths_found = {len(h.tokens) - (n + 10) for hyps, n in zip(batched, lengths) for h in hyps}
    assert 0 in lengths_found and min(lengths_found) < -5  # EOS stops and max-length stops
    for i, n in enumerate(lengths):
        single = beam_search(model, src[i : i + 1, :n], beam_size=4, max_len_b=10, nbest=3)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in single]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in single], abs=1e-4)


def test_beam_nbest_sorted_and_scores_consistent(model, beam_path):
    src = sources([6, 9], seed=6)
    alpha = 0.6
    results = beam_search(model, src, beam_size=5, nbest=5, length_penalty=alpha, max_len_b=10)
    for row, hyps in enumerate(results):
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5
        for h in hyps:
            assert isinstance(h, Hypothesis) and EOS not in h.tokens and BOS not in h.tokens
            # log_prob is the model's probability of tokens + EOS, scored without the cache.
            target = torch.tensor([[BOS] + h.tokens])
            encoder_out = model.encode(src[row : row + 1])
            with torch.no_grad():
                logp = torch.log_softmax(model.decode(target, encoder_out).logits[0].float(), -1)
            gold = h.tokens + [EOS]
            expected = float(logp[torch.arange(len(gold)), gold].sum())
            assert h.log_prob == pytest.approx(expected, abs=1e-4)
            assert h.score == pytest.approx(expected / length_penalty(len(gold), alpha), abs=1e-4)


def test_beam_better_than_greedy_in_model_score(model):
    src = sources([7], seed=7)
    greedy = beam_search(model, src, beam_size=1, length_penalty=0.0, max_len_b=10)[0][0]
    beam = beam_search(model, src, beam_size=8, length_penalty=0.0, max_len_b=10)[0][0]
    assert beam.log_prob >= greedy.log_prob - 1e-5


def test_beam_max_length(model, beam_path):
    src = sources([4, 7], seed=8)
    results = beam_search(model, src, beam_size=3, nbest=3, max_len_a=0.0, max_len_b=2)
    assert all(len(h.tokens) <= 2 for hyps in results for h in hyps)


def test_beam_argument_errors(model):
    src = sources([3])
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, src, beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, beam_size=0)


# --- a scripted model (fairseq tests/test_sequence_generator.py style) -------------------------

A, B, C = 4, 5, 6  # ordinary tokens of the scripted vocabulary [pad, unk, bos, eos, a, b, c]


class ScriptedModel:
    """Next-token probabilities from a table keyed by (source sentence, target prefix).

    The source's first token selects the table; prefixes are tuples of generated tokens (no BOS);
    tokens absent from a distribution have probability 0. Records the batch size of every step.
    """

    def __init__(self, tables: dict[int, dict[tuple, dict[int, float]]], default: dict[int, float]):
        self.tables, self.default = tables, default
        self.config = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS, max_positions=100)
        self.vocab = 7
        self.rows_per_step: list[int] = []

    def encode(self, src_tokens):
        return ScriptedEncoderOut(src_tokens[:, 0].clone())

    def new_cache(self):
        return ScriptedCache(None)

    def decode(self, tgt_tokens, encoder_out, cache=None):
        # Incremental; each source row serves G consecutive target rows (its beams), as in Transformer.decode.
        rows, sources = tgt_tokens.size(0), encoder_out.sources.numel()
        assert tgt_tokens.size(1) == 1 and rows % sources == 0
        cache.prefix = tgt_tokens if cache.prefix is None else torch.cat([cache.prefix, tgt_tokens], 1)
        self.rows_per_step.append(rows)
        logits = torch.full((rows, 1, self.vocab), float("-inf"))
        row_sources = encoder_out.sources.repeat_interleave(rows // sources).tolist()
        for row, (source, prefix) in enumerate(zip(row_sources, cache.prefix.tolist())):
            assert prefix[0] == BOS
            dist = self.tables[source].get(tuple(prefix[1:]), self.default)
            for token, prob in dist.items():
                logits[row, 0, token] = math.log(prob)
        return SimpleNamespace(logits=logits)


class ScriptedEncoderOut:
    def __init__(self, sources):
        self.sources = sources

    def reorder(self, index):
        return ScriptedEncoderOut(self.sources.index_select(0, index))


class ScriptedCache:
    """Mirrors DecoderCache: the prefix plays the self-attention cache; the cross part is a row
    count that must follow the surviving sentences."""

    def __init__(self, prefix):
        self.prefix = prefix

    def reorder(self, index, include_cross=True):
        self.prefix = self.prefix.index_select(0, index)

    def reorder_cross(self, index):
        pass


def test_scripted_length_penalty_changes_winner(beam_path):
    # "a </s>" has the higher log-prob; "b b b </s>" wins once scores are divided by lp(length).
    table = {
        (): {A: 0.5, B: 0.48, EOS: 0.01, UNK: 0.01},
        (A,): {EOS: 0.9, UNK: 0.1},
        (B,): {B: 0.97, UNK: 0.02, EOS: 0.01},
        (B, B): {B: 0.97, UNK: 0.02, EOS: 0.01},
        (B, B, B): {EOS: 0.97, UNK: 0.03},
    }
    model = ScriptedModel({A: table}, default={UNK: 0.9, EOS: 0.1})
    short = math.log(0.5) + math.log(0.9)  # -0.799
    long = math.log(0.48) + 2 * math.log(0.97) + math.log(0.97)  # -0.825
    src = torch.tensor([[A, C]])

    raw = beam_search(model, src, beam_size=2, nbest=2, length_penalty=0.0)[0]
    assert [h.tokens for h in raw] == [[A], [B, B, B]]
    assert [h.log_prob for h in raw] == pytest.approx([short, long])
    assert [h.score for h in raw] == pytest.approx([short, long])

    normalised = beam_search(model, src, beam_size=2, nbest=2, length_penalty=1.0)[0]
    assert [h.tokens for h in normalised] == [[B, B, B], [A]]
    assert [h.score for h in normalised] == pytest.approx([long / (9 / 6), short / (7 / 6)])
    assert normalised[0].score == pytest.approx(-0.5502, abs=1e-4)


def test_scripted_eos_cannot_starve_the_beam(beam_path):
    # Step 0: EOS ranks 2nd, so it finishes the empty hypothesis. Keeping only the top K = 2
    # candidates would leave "a" as the single live beam and end with {"", "a </s>"}: the empty
    # output would win. With 2K candidates "b" stays live and "b </s>" wins under alpha = 1.
    table = {
        (): {A: 0.36, EOS: 0.32, B: 0.30, UNK: 0.02},
        (A,): {UNK: 0.8, EOS: 0.2},
        (B,): {EOS: 0.95, UNK: 0.05},
    }
    model = ScriptedModel({A: table}, default={UNK: 0.9, EOS: 0.1})
    best = beam_search(model, torch.tensor([[A]]), beam_size=2, nbest=2, length_penalty=1.0)[0]
    b_eos = math.log(0.30) + math.log(0.95)
    assert [h.tokens for h in best] == [[B], []]
    assert best[0].log_prob == pytest.approx(b_eos)
    assert best[0].score == pytest.approx(b_eos / (7 / 6))  # -1.0758 > log(0.32) = -1.1394
    assert best[1].score == pytest.approx(math.log(0.32))


def test_scripted_max_length_forces_eos_and_done_rows_are_dropped(beam_path):
    # Sentence A would never stop ("a" forever); sentence B stops at once. max length = 0 * S + 3.
    loop = {(): {A: 0.7, EOS: 0.3}}
    for n in range(1, 10):
        loop[(A,) * n] = {A: 0.7, EOS: 0.3}
    stop = {(): {EOS: 0.6, B: 0.4}, (B,): {EOS: 1.0}}
    model = ScriptedModel({A: loop, B: stop}, default={EOS: 1.0})
    src = torch.tensor([[A, C, C], [B, PAD, PAD]])

    greedy = greedy_search(model, src, max_len_a=0.0, max_len_b=3)
    assert greedy == [[A, A, A], []]
    assert model.rows_per_step == [2, 1, 1, 1]  # sentence B left the batch after step 0

    model.rows_per_step.clear()
    hyps = beam_search(model, src, beam_size=2, nbest=2, length_penalty=0.0, max_len_a=0.0, max_len_b=3)
    # Sentence A: EOS ranks 2nd at every step, so "", "a" finish first; early stopping at 2.
    assert [h.tokens for h in hyps[0]] == [[], [A]]
    assert [h.log_prob for h in hyps[0]] == pytest.approx([math.log(0.3), math.log(0.7 * 0.3)])
    assert [h.tokens for h in hyps[1]] == [[], [B]]
    assert [h.log_prob for h in hyps[1]] == pytest.approx([math.log(0.6), math.log(0.4)])
    assert model.rows_per_step == [2, 4]  # the first step runs once per sentence, then once per beam

    # A single beam follows "a" to the maximum length, where EOS is forced: log p = 3 log .7 + log .3.
    forced = beam_search(model, src[:1], beam_size=1, length_penalty=0.0, max_len_a=0.0, max_len_b=3)[0][0]
    assert forced.tokens == [A, A, A]
    assert forced.log_prob == pytest.approx(3 * math.log(0.7) + math.log(0.3))


def test_greedy_reuses_given_encoder_output(model):
    src = sources([5, 9, 3], seed=4)
    encoder_out = model.encode(src)
    assert greedy_search(model, src, max_len_b=6, encoder_out=encoder_out) == greedy_search(model, src, max_len_b=6)
    # A wrong encoder output changes the result: the argument is really used.
    other = model.encode(sources([5, 9, 3], seed=9))
    assert greedy_search(model, src, max_len_b=6, encoder_out=other) != greedy_search(model, src, max_len_b=6)


def test_max_length_zero_gives_the_one_hypothesis_there_is(model, beam_path):
    src = sources([4, 7], seed=8)
    results = beam_search(model, src, beam_size=3, nbest=3, max_len_a=0.0, max_len_b=0)
    assert [[h.tokens for h in hyps] for hyps in results] == [[[]], [[]]]  # EOS first: fewer than nbest
    assert all(math.isfinite(hyps[0].score) for hyps in results)


def test_nan_scores_give_a_clear_error_not_an_empty_result(model, beam_path, monkeypatch):
    nan_model = Transformer(model.config).eval()
    nan_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        nan_model.output_projection.weight.fill_(float("nan"))  # every logit NaN
    with pytest.raises(RuntimeError, match="no hypothesis with a finite score for sentence 0"):
        beam_search(nan_model, sources([4, 7], seed=8), beam_size=2)


_KERNEL_PROCESS = """
import sys, torch
from aiayn.inference import fused_beam_step as f
assert f.available()
torch.manual_seed(0)
scores, logits = torch.randn(2, 4), torch.randn(8, 50)
got = f.fused_beam_step(scores, logits, None, pad_id=0, bos_id=1, eos_id=2)
print(int("torch._inductor" in sys.modules), int("torch._dynamo" in sys.modules), f.cached_library().is_file())
print(" ".join(str(x) for t in got for x in t.flatten().tolist()))
"""


@pytest.mark.slow(seconds=12)
@NEEDS_FUSED
def test_a_later_process_loads_the_kept_kernel_without_inductor(tmp_path):
    """The first process builds through inductor and keeps the library in aiayn's cache; the next
    one loads it from there, importing neither inductor nor dynamo, and computes the same step."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIAYN_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", _KERNEL_PROCESS], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines() for _ in range(2)]
    assert runs[0][0] == "1 1 True"  # built: inductor imported, library kept
    assert runs[1][0] == "0 0 True"  # loaded from the cache
    assert runs[0][1] == runs[1][1]
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.slow(seconds=5)
@NEEDS_FUSED
def test_a_damaged_kept_kernel_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
    path = fused_beam_step.cached_library()
    assert path.parent == tmp_path and path.name.startswith("fused_beam_step-")
    path.write_bytes(b"not a library")
    with pytest.raises(ImportError):
        fused_beam_step._load_library(path)
    monkeypatch.setattr(fused_beam_step, "_kernel", None)  # as in a fresh process
    monkeypatch.setattr(fused_beam_step, "_failed", False)
    assert fused_beam_step._load() is not None and not fused_beam_step._failed
    assert path.read_bytes() != b"not a library"  # built again and kept
    assert fused_beam_step._load_library(path) is not None
