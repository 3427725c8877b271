"""Greedy and beam search (paper section 6.1: beam 4, length penalty alpha = 0.6, max length S + 50).

Shape legend: B sentences, K beam size, A sentences still active, S source length, V vocabulary,
C = 2K candidates per sentence.

A beam step turns the decoder's logits into the 2K best candidates (`log_prob_step`: log-softmax,
token masks, `beam_step`); a faster step with the same result can be handed to `beam_search`
(`step=`, e.g. the fused C++ one of `aiayn.inference`).

Layout follows fairseq: a pure `beam_step` (fairseq `search.py` BeamSearch.step) that picks the top
2K (score, beam, token) candidates, and a short loop (fairseq `sequence_generator.py`) that owns the
decoding state: the encoder output, one row per sentence shared by its K beams, and the
caller-owned KV cache (`model.new_cache()`), whose self-attention part is reordered by the chosen
beams each step. Cross-attention keys / values are computed on the first step, once per sentence.
Sentences that are done are dropped from the batch (`cache.reorder` / `cache.reorder_cross` /
`EncoderOutput.reorder` with the surviving rows), so they stop costing compute, and every sentence
is decoded exactly as it would be on its own (padding invariance).

Conventions:
    * Outputs are token ids without BOS / EOS.
    * The maximum output length of a row is floor(max_len_a * (its real source length) + max_len_b),
      capped at max_positions - 1 (the decoder input is BOS + the tokens). At that length EOS is
      forced.
    * <pad> and <s> are never generated. There is no minimum length (EOS may come first).
    * Scores: log-probabilities in float32 (log_softmax on float logits, so bf16 autocast by the
      caller is fine). A finished hypothesis of n tokens plus EOS has
      log_prob = sum of its n + 1 token log-probs and score = log_prob / length_penalty(n + 1, alpha)
      (GNMT, Wu et al. 2016, eq. 14, without the coverage penalty; the length counts EOS as
      fairseq and tensor2tensor do).
    * Stopping (fairseq's default, "early stopping"): a sentence is done as soon as it has
      `beam_size` finished hypotheses, even if an active beam could still beat one of them after
      length normalisation; or when it reaches its maximum length. As in fairseq, an EOS candidate
      only finishes a hypothesis when it ranks among the top K candidates of its sentence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

# --- pieces -------------------------------------------------------------------------------------


@dataclass
class Hypothesis:
    """One finished translation: tokens without BOS / EOS, length-normalised score, total log-prob."""

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty(length: float, alpha: float) -> float:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14); alpha = 0 -> 1."""
    return ((5.0 + length) / 6.0) ** alpha


def check_beam_step_shapes(scores: Tensor, step_log_probs: Tensor) -> None:
    """Raises ValueError unless scores is [B, K] and step_log_probs [B, K, V]."""
    if scores.dim() != 2 or step_log_probs.dim() != 3 or step_log_probs.shape[:2] != scores.shape:
        raise ValueError(
            f"beam_step needs scores [B, K] and step_log_probs [B, K, V], got "
            f"{tuple(scores.shape)} and {tuple(step_log_probs.shape)}"
        )


def beam_step(scores: Tensor, step_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top 2K continuations of every sentence's beams (pure function, fairseq BeamSearch.step).

    Keeping twice the beam means that even if all K best continuations end in EOS, K live ones
    remain to carry on the beam: EOS cannot starve it. The candidates are the 2K best of each
    sentence's K * V sums (beam score + token log-prob).

    Args:
        scores: cumulative log-probs of the live beams [B, K] (-inf marks an empty beam slot).
        step_log_probs: next-token log-probs of each beam [B, K, V].
    Returns:
        (candidate scores [B, C], beam index of each candidate [B, C], token id [B, C]) with
        C = min(2K, K * V), sorted by score descending within each sentence.
    Raises:
        ValueError: if the shapes disagree.
    """
    check_beam_step_shapes(scores, step_log_probs)
    batch, beam, vocab = step_log_probs.shape
    sums = (scores.unsqueeze(-1) + step_log_probs).reshape(batch, -1)  # [B, K * V]
    cand_scores, flat_index = sums.topk(min(2 * beam, beam * vocab), dim=-1)  # [B, C]
    return cand_scores, flat_index // vocab, flat_index % vocab


def max_output_lengths(model, src_tokens: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """floor(a * real source length + b) per row, capped at max_positions - 1: LongTensor [B]."""
    src_lengths = (src_tokens != model.config.pad_id).sum(dim=1)  # [B]
    lengths = (src_lengths.double() * max_len_a + max_len_b).floor().long()
    return lengths.clamp(min=0, max=model.config.max_positions - 1)


def _mask_tokens(scores: Tensor, at_max: Tensor | None, *, pad_id: int, bos_id: int, eos_id: int) -> Tensor:
    """In place on float32 [N, V] next-token scores: <pad> and <s> are never generated; rows where
    `at_max` (bool [N], None = no row) may only produce EOS. Returns `scores`."""
    scores[:, pad_id] = float("-inf")
    scores[:, bos_id] = float("-inf")
    if at_max is not None:
        eos_column = scores[:, eos_id].clone()
        scores[at_max] = float("-inf")
        scores[:, eos_id] = eos_column
    return scores


def log_prob_step(
    scores: Tensor, logits: Tensor, at_max: Tensor | None, *, pad_id: int, bos_id: int, eos_id: int,
    select=beam_step, forced: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One beam step from the decoder's logits: log-softmax, token masks (`_mask_tokens`), then
    `select` (`beam_step`, or an equivalent). The reference for any faster step handed to
    `beam_search(step=...)`.

    Args:
        scores: cumulative log-probs of the live beams [A, K] (-inf marks an empty beam slot).
        logits: float32 [A*R, V] next-token logits, R = 1 (the first step: every beam of a
            sentence continues its one row) or K; overwritten.
        at_max: bool [A*R], rows that may only produce EOS; None for none.
        forced: long [A*R], the only token each row may produce (a target prefix), -1 = free row.
    Returns:
        (candidate scores, beam index, token id), each [A, 2K], best first.
    """
    # In place: a fresh [N, V] buffer per step costs page faults.
    log_probs = _mask_tokens(torch.log_softmax(logits, dim=-1, out=logits), at_max,
                             pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    if forced is not None:
        _force_tokens(log_probs, forced)
    active, beam = scores.shape
    log_probs = log_probs.view(active, -1, log_probs.size(-1)).expand(-1, beam, -1)  # [A, K, V]
    return select(scores, log_probs)


def _force_tokens(log_probs: Tensor, forced: Tensor) -> Tensor:
    """In place on [N, V] log-probs: rows with forced[row] >= 0 keep only that token's log-prob
    (not renormalised: a prefix is scored by the model like any other tokens)."""
    rows = (forced >= 0).nonzero().squeeze(1)
    if rows.numel():
        kept = log_probs[rows, forced[rows]].clone()
        log_probs[rows] = float("-inf")
        log_probs[rows, forced[rows]] = kept
    return log_probs


def _check_prefix(prefix: list[list[int]] | None, batch: int, config) -> list[list[int]] | None:
    """`prefix` as lists of ints, checked: one per sentence, real tokens, room for EOS."""
    if prefix is None or not any(prefix):
        return None
    if len(prefix) != batch:
        raise ValueError(f"prefix has {len(prefix)} entries for {batch} sentences")
    prefix = [[int(token) for token in tokens] for tokens in prefix]
    specials = {config.pad_id, config.bos_id, config.eos_id}
    for sentence, tokens in enumerate(prefix):
        if any(token in specials or not 0 <= token < config.vocab_size for token in tokens):
            raise ValueError(f"prefix of sentence {sentence} holds a special or unknown token id: {tokens}")
        if len(tokens) > config.max_positions - 1:
            raise ValueError(f"prefix of sentence {sentence} has {len(tokens)} tokens; at most "
                             f"{config.max_positions - 1} fit")
    return prefix


def _forced_tokens(prefix: list[list[int]] | None, sentences: list[int], position: int,
                   rows_per_sentence: int, device: torch.device | None = None) -> Tensor | None:
    """The token each decoder row must produce at `position` (-1: free), [A*R]; None when no
    active sentence is inside its prefix."""
    if prefix is None or all(position >= len(prefix[s]) for s in sentences):
        return None
    forced = [prefix[s][position] if position < len(prefix[s]) else -1 for s in sentences]
    return torch.tensor(forced, device=device).repeat_interleave(rows_per_sentence)


# --- greedy -------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_search(
    model, src_tokens: Tensor, *, max_len_a: float = 1.0, max_len_b: int = 50, encoder_out=None
) -> list[list[int]]:
    """Most probable next token at every step, incrementally with the KV cache.

    Args:
        model: a `Transformer` (or anything with encode / decode / new_cache / config).
        src_tokens: LongTensor [B, S], right-padded with pad_id, no BOS / EOS.
        max_len_a, max_len_b: max output length = floor(a * source length + b) per row.
        encoder_out: `model.encode(src_tokens)` if the caller already has it.
    Returns:
        B lists of token ids, without BOS / EOS.
    """
    config = model.config
    batch = src_tokens.size(0)
    device = src_tokens.device
    if encoder_out is None:
        encoder_out = model.encode(src_tokens)
    max_lens = max_output_lengths(model, src_tokens, max_len_a, max_len_b)  # [B]
    shortest_max_len = int(max_lens.min()) if batch else 0  # of the active rows
    rows = torch.arange(batch, device=device)  # original index of each active row
    outputs: list[list[int]] = [[] for _ in range(batch)]
    last = torch.full((batch, 1), config.bos_id, dtype=torch.long, device=device)  # [A, 1]
    cache = model.new_cache()
    step = 0
    while rows.numel():
        at_max = max_lens[rows] <= step if step >= shortest_max_len else None  # [A] or None
        logits = model.decode(last, encoder_out, cache=cache).logits[:, -1].float()  # [A, V]
        logits = _mask_tokens(logits, at_max, pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
        next_tokens = logits.argmax(dim=-1)  # [A]: the argmax of the logits is that of the log-probs
        finished = next_tokens == config.eos_id
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            if token != config.eos_id:
                outputs[row].append(token)
        if finished.any():  # drop finished rows so they stop costing compute
            keep = (~finished).nonzero().squeeze(1)  # [A']
            cache.reorder(keep)
            encoder_out = encoder_out.reorder(keep)
            rows, next_tokens = rows[keep], next_tokens[keep]
            shortest_max_len = int(max_lens[rows].min()) if rows.numel() else 0
        last = next_tokens[:, None]  # [A, 1]
        step += 1
    return outputs


# --- beam ---------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(
    model,
    src_tokens: Tensor,
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_len_a: float = 1.0,
    max_len_b: int = 50,
    nbest: int = 1,
    step=None,
    prefix: list[list[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search with the KV cache (see the module docstring for the conventions).

    Args:
        model: a `Transformer` (or anything with encode / decode / new_cache / config).
        src_tokens: LongTensor [B, S], right-padded with pad_id, no BOS / EOS.
        beam_size: K; 1 gives greedy search.
        length_penalty: alpha of the GNMT penalty (0 = rank by raw log-prob).
        max_len_a, max_len_b: max output length = floor(a * source length + b) per row.
        nbest: hypotheses returned per sentence, best first.
        step: the beam step, `log_prob_step` (None) or a faster function with its signature and
            result (`aiayn.inference.beam_step_for`).
        prefix: per sentence, the token ids every hypothesis must start with (target prefix, as
            CTranslate2's target_prefix): while a sentence is inside its prefix, only the next
            prefix token may follow (with its own log-prob: scores stay those of the model), and
            its maximum length is at least the prefix's.
    Returns:
        B lists of hypotheses sorted by score, descending: `nbest` of them, or fewer where fewer
        exist (a maximum length of 0 leaves only the empty translation). Tokens include the prefix.
    Raises:
        ValueError: beam_size < 1, nbest outside [1, beam_size], or length_penalty < 0.
        RuntimeError: a sentence ends with no hypothesis (NaN / -inf scores everywhere).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be in [1, beam_size={beam_size}], got {nbest}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    alpha = length_penalty
    config = model.config
    eos = config.eos_id
    batch, beam = src_tokens.size(0), beam_size
    device = src_tokens.device

    beam_step_of = log_prob_step if step is None else step  # logits -> the 2K best candidates
    max_lens = max_output_lengths(model, src_tokens, max_len_a, max_len_b)  # [B]
    prefix = _check_prefix(prefix, batch, model.config)
    if prefix is not None:
        max_lens = torch.maximum(max_lens, torch.tensor([len(p) for p in prefix], device=max_lens.device))
    # One memory row per sentence, shared by its K beams: the decoder's cross-attention reads a
    # sentence's keys and values once for all its beams (and caches them once).
    encoder_out = model.encode(src_tokens)  # [A] rows
    cache = model.new_cache()
    # Bookkeeping per active sentence in Python lists (cheaper than tensor ops at small batches).
    sentences = list(range(batch))  # original index of each active sentence [A]
    max_len_of = max_lens.tolist()
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    # All beams start identical (BOS), so only slot 0 is live at first, and the first decoder step
    # runs once per sentence (R = 1 row per sentence); from the second step on R = K.
    scores = torch.full((batch, beam), float("-inf"), device=device)  # [A, K]
    scores[:, 0] = 0.0
    history = [[config.bos_id] for _ in range(batch)]  # [A*R] rows of BOS + tokens
    last_tokens = torch.full((batch, 1), config.bos_id, dtype=torch.long, device=device)  # [A*R, 1]
    position = 0  # of the token each step decodes
    while sentences:
        active = len(sentences)
        rows_per_sentence = 1 if position == 0 else beam
        at_max = [max_len_of[s] <= position for s in sentences]
        at_max_rows = (  # [A*R] or None
            torch.tensor(at_max, device=device).repeat_interleave(rows_per_sentence) if any(at_max) else None
        )
        logits = model.decode(last_tokens, encoder_out, cache=cache).logits[:, -1].float()  # [A*R, V]
        forced = _forced_tokens(prefix, sentences, position, rows_per_sentence, device)  # [A*R] or None
        step_of = beam_step_of if forced is None else functools.partial(log_prob_step, forced=forced)
        cand_scores, cand_beams, cand_tokens = step_of(
            scores, logits, at_max_rows, pad_id=config.pad_id, bos_id=config.bos_id, eos_id=eos
        )  # [A, C]

        # The rest of the step is bookkeeping on 2K candidates per sentence, in Python lists.
        keep: list[int] = []  # surviving sentences [A']
        rows: list[int] = []  # parent row of each new beam [A'*K]
        next_tokens: list[int] = []  # [A'*K]
        next_scores: list[float] = []  # [A'*K]
        for a, (sentence, c_scores, c_beams, c_tokens) in enumerate(
            zip(sentences, cand_scores.tolist(), cand_beams.tolist(), cand_tokens.tolist())
        ):
            hyps = finished[sentence]
            # One row per sentence at the first step (R = 1): every candidate's parent is that row.
            parents = [a * rows_per_sentence + (b if rows_per_sentence > 1 else 0) for b in c_beams]
            # Finish the hypotheses whose EOS ranks among the top K candidates.
            for c in range(min(beam, len(c_tokens))):
                if c_tokens[c] == eos and c_scores[c] > _NEG_INF and len(hyps) < beam:
                    tokens = history[parents[c]][1:]
                    hyps.append(Hypothesis(tokens, c_scores[c] / _lp(len(tokens) + 1, alpha), c_scores[c]))
            # The next beam: the K best candidates that are not EOS (there are at least K of the 2K).
            chosen = [c for c, token in enumerate(c_tokens) if token != eos][:beam]
            if len(chosen) < beam:  # a tiny vocabulary: EOS candidates fill dead slots (score -inf)
                chosen += [c for c, token in enumerate(c_tokens) if token == eos][: beam - len(chosen)]
            live = [c_scores[c] if c_tokens[c] != eos else _NEG_INF for c in chosen]
            if len(hyps) >= beam or at_max[a] or not any(score > _NEG_INF for score in live):
                continue  # done: it leaves the batch
            keep.append(a)
            rows += [parents[c] for c in chosen]
            next_tokens += [c_tokens[c] for c in chosen]
            next_scores += live

        sentences = [sentences[a] for a in keep]
        if not sentences:
            break
        cache.reorder(torch.tensor(rows, device=device), include_cross=False)  # beams move within a sentence
        if len(keep) < active:  # finished sentences leave the memory and its caches
            keep_index = torch.tensor(keep, device=device)
            encoder_out = encoder_out.reorder(keep_index)
            cache.reorder_cross(keep_index)
        history = [history[row] + [token] for row, token in zip(rows, next_tokens)]
        last_tokens = torch.tensor(next_tokens, device=device).view(-1, 1)
        scores = torch.tensor(next_scores, device=device).view(len(keep), beam)
        position += 1

    for sentence, hyps in enumerate(finished):
        if not hyps:  # only when every score is NaN / -inf: the maximum length forces EOS otherwise
            raise RuntimeError(
                f"beam search found no hypothesis with a finite score for sentence {sentence} of the batch: "
                "the model's scores are NaN or -inf (a diverged or damaged model?)"
            )
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


# --- sampling -----------------------------------------------------------------------------------


def filter_distribution(log_probs: Tensor, *, topk: int = 0, topp: float = 1.0, temperature: float = 1.0) -> Tensor:
    """The distribution a sample is drawn from: softmax(log_probs / temperature), cut to the `topk`
    most probable tokens (0 = all) and then to the smallest set whose probability reaches `topp`
    (nucleus sampling, Holtzman et al. 2020), renormalised. [N, V] -> probabilities [N, V] float64.
    Ties at the cut keep the lower token ids (a stable sort), so the result is deterministic."""
    probs = torch.softmax(log_probs.double() / temperature, dim=-1)  # [N, V]
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    sorted_probs = order.values
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if topk > 0:
        keep[:, topk:] = False
    if topp < 1.0:
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        keep &= before < topp  # the top token is always kept
    sorted_probs = sorted_probs * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order.indices, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _draw(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One token per row by inverse-CDF sampling, each row with its own generator: a row's draw
    depends on its generator and its distribution alone, never on the other rows of the batch."""
    uniform = torch.tensor([float(torch.rand(1, generator=g, dtype=torch.float64)) for g in generators],
                           dtype=torch.float64, device=probs.device)  # [N]
    cdf = probs.cumsum(dim=-1)  # [N, V]
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(1)  # [N]
    return tokens.clamp(max=probs.size(-1) - 1)


@torch.no_grad()
def sample_search(
    model,
    src_tokens: Tensor,
    *,
    seeds: list[int],
    samples: int = 1,
    topk: int = 0,
    topp: float = 1.0,
    temperature: float = 1.0,
    length_penalty: float = 0.6,
    max_len_a: float = 1.0,
    max_len_b: int = 50,
    prefix: list[list[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Random sampling with the KV cache: `samples` independent translations per sentence, each
    token drawn from `filter_distribution` of the model's next-token log-probs.

    Sample k of sentence b uses its own generator, seeded with `seeds[b]` and k, so the same seed
    gives the same samples, and batching (which sentences share a batch, in which order) never
    changes them. Scores are the model's own (temperature 1, no cut): log_prob = sum of the token
    log-probs, score = log_prob / length_penalty(n + 1) as in `beam_search`; hypotheses are sorted
    by score. Token masks, maximum lengths and `prefix` as in `beam_search`.

    Raises:
        ValueError: a bad setting (samples < 1, topk < 0, topp outside (0, 1], temperature <= 0)
            or not one seed per sentence.
    """
    batch = src_tokens.size(0)
    if samples < 1 or topk < 0 or not 0.0 < topp <= 1.0 or not temperature > 0:
        raise ValueError(f"bad sampling settings: samples {samples}, topk {topk}, topp {topp}, "
                         f"temperature {temperature}")
    if len(seeds) != batch:
        raise ValueError(f"sample_search needs one seed per sentence: {len(seeds)} for {batch}")
    config = model.config
    device = src_tokens.device
    prefix = _check_prefix(prefix, batch, config)
    max_lens = max_output_lengths(model, src_tokens, max_len_a, max_len_b)  # [B]
    if prefix is not None:
        max_lens = torch.maximum(max_lens, torch.tensor([len(p) for p in prefix], device=max_lens.device))
    # Row r = sample r % samples of sentence r // samples, with a memory row of its own (rows
    # leave at different steps, so sentences cannot share one as in beam search).
    owner = [b for b in range(batch) for _ in range(samples)]  # sentence of each row
    max_len_of = max_lens.tolist()
    encoder_out = model.encode(src_tokens).reorder(torch.tensor(owner, dtype=torch.long, device=device))
    generators = [torch.Generator().manual_seed((seeds[b] * 1_000_003 + k) % (1 << 63))
                  for b in range(batch) for k in range(samples)]
    rows = list(range(batch * samples))  # original index of each active row
    tokens: list[list[int]] = [[] for _ in rows]
    log_prob = [0.0 for _ in rows]
    last = torch.full((batch * samples, 1), config.bos_id, dtype=torch.long, device=device)  # [A, 1]
    cache = model.new_cache()
    position = 0
    while rows:
        at_max = torch.tensor([max_len_of[owner[r]] <= position for r in rows], device=device)  # [A]
        logits = model.decode(last, encoder_out, cache=cache).logits[:, -1].float()  # [A, V]
        log_probs = _mask_tokens(torch.log_softmax(logits, dim=-1), at_max if bool(at_max.any()) else None,
                                 pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
        probs = filter_distribution(log_probs, topk=topk, topp=topp, temperature=temperature)  # [A, V]
        if prefix is not None:  # inside its prefix, a row's next token is given, with its log-prob
            forced = torch.tensor([prefix[owner[r]][position] if position < len(prefix[owner[r]]) else -1
                                   for r in rows], device=device)  # [A]
            forced_rows = (forced >= 0).nonzero().squeeze(1)
            probs[forced_rows] = 0.0
            probs[forced_rows, forced[forced_rows]] = 1.0
        drawn_tokens = _draw(probs, [generators[r] for r in rows])  # [A]
        drawn_log_probs = log_probs.gather(1, drawn_tokens[:, None]).squeeze(1).tolist()  # [A]
        drawn = drawn_tokens.tolist()
        keep = []
        for i, (r, token) in enumerate(zip(rows, drawn)):
            log_prob[r] += drawn_log_probs[i]
            if token != config.eos_id:
                tokens[r].append(token)
                keep.append(i)
        if len(keep) < len(rows):  # finished rows leave the batch and its caches
            keep_index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.reorder(keep_index)
            encoder_out = encoder_out.reorder(keep_index)
            rows, drawn = [rows[i] for i in keep], [drawn[i] for i in keep]
        last = torch.tensor(drawn, dtype=torch.long, device=device).view(-1, 1)
        position += 1
    results = []
    for b in range(batch):
        hyps = [Hypothesis(tokens[r], log_prob[r] / _lp(len(tokens[r]) + 1, length_penalty), log_prob[r])
                for r in range(b * samples, (b + 1) * samples)]
        results.append(sorted(hyps, key=lambda h: h.score, reverse=True))
    return results


# --- forced decoding ------------------------------------------------------------------------------


@torch.no_grad()
def score_tokens(model, src_tokens: Tensor, targets: list[list[int]]) -> list[list[float]]:
    """Forced decoding (teacher forcing): the log-probability of each target token and of the
    final EOS under the model, the numbers beam search adds up for the same tokens.

    Args:
        src_tokens: LongTensor [B, S], right-padded, no BOS / EOS.
        targets: B lists of token ids without BOS / EOS.
    Returns:
        B lists of len(target) + 1 float log-probs (the last one is EOS's). <pad> and <s> are
        impossible as in the search; a target too long for max_positions raises ValueError.
    """
    config = model.config
    if len(targets) != src_tokens.size(0):
        raise ValueError(f"{len(targets)} targets for {src_tokens.size(0)} sources")
    longest = max((len(t) for t in targets), default=0) + 1
    if longest > config.max_positions:
        raise ValueError(f"a target of {longest - 1} tokens does not fit max_positions {config.max_positions}")
    device = src_tokens.device
    tgt_in = torch.full((len(targets), longest), config.pad_id, dtype=torch.long, device=device)  # [B, T]
    tgt_out = torch.full_like(tgt_in, config.pad_id)
    for row, target in enumerate(targets):
        tgt_in[row, : len(target) + 1] = torch.tensor([config.bos_id, *target], dtype=torch.long)
        tgt_out[row, : len(target) + 1] = torch.tensor([*target, config.eos_id], dtype=torch.long)
    logits = model.decode(tgt_in, model.encode(src_tokens)).logits.float()  # [B, T, V]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tgt_out[..., None]).squeeze(-1)  # [B, T]
    return [log_probs[row, : len(target) + 1].tolist() for row, target in enumerate(targets)]


_lp = length_penalty  # the function, under a name the `length_penalty` argument does not shadow
_NEG_INF = float("-inf")
