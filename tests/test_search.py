"""Greedy and beam search against numbers: cached == uncached, batch == single, scripted tables."""

import math
from types import SimpleNamespace

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.search import Hypothesis, beam_search, beam_step, greedy_search, length_penalty

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    # A larger init scale than the default makes the random model's distributions peaked enough
    # that greedy output is not dominated by near-ties, and long enough to exercise many steps.
    model = Transformer(ModelConfig.preset("tiny", vocab_size=40, max_positions=64)).eval()
    with torch.no_grad():
        model.src_embedding.weight.mul_(3.0)
        model.src_embedding.weight[EOS].mul_(0.3)  # make EOS less likely: longer outputs
    return model


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


# --- the real model -----------------------------------------------------------------------------


def test_greedy_cached_equals_uncached(model):
    src = sources([7, 4, 9])
    out = greedy_search(model, src, max_len_a=1.0, max_len_b=10)
    assert sum(len(o) for o in out) > 10  # not trivially empty
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


def test_beam_one_equals_greedy(model):
    src = sources([6, 2, 10, 4], seed=4)
    greedy = greedy_search(model, src, max_len_b=12)
    beam = beam_search(model, src, beam_size=1, max_len_b=12)
    assert [hyps[0].tokens for hyps in beam] == greedy


def test_beam_batch_equals_single(model):
    lengths = [5, 12, 2, 8]
    src = sources(lengths, seed=5)
    batched = beam_search(model, src, beam_size=4, max_len_b=10, nbest=3)
    for i, n in enumerate(lengths):
        single = beam_search(model, src[i : i + 1, :n], beam_size=4, max_len_b=10, nbest=3)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in single]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in single], abs=1e-4)


def test_beam_nbest_sorted_and_scores_consistent(model):
    src = sources([6, 9], seed=6)
    alpha = 0.6
    results = beam_search(model, src, beam_size=5, nbest=5, length_penalty=alpha, max_len_b=10)
    for row, hyps in enumerate(results):
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5
        for h in hyps:
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


def test_beam_max_length(model):
    src = sources([4, 7], seed=8)
    results = beam_search(model, src, beam_size=3, nbest=3, max_len_a=0.0, max_len_b=2)
    assert all(len(h.tokens) <= 2 for hyps in results for h in hyps)


def test_beam_argument_errors(model):
    src = sources([3])
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, src, beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, beam_size=0)
