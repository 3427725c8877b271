"""Decoding: one loop, three strategies (paper section 6.1: beam 4, length penalty alpha = 0.6,
max length S + 50).

Shape legend: B sentences, K beam size (rows per group), A groups still active, S source length,
V vocabulary, C candidates per group (2K for beam search).

Layout follows fairseq: strategy objects (`Search.step`, fairseq `search.py`) turn the decoder's
logits into candidates: `BeamSearch` (the pure `beam_step`: the top 2K (score, beam, token)
candidates, through `log_prob_step`: log-softmax, token masks, `beam_step`; or a faster step with
the same result, `step=`, e.g. the fused C++ one of `aiayn.inference`), `GreedySearch` (argmax)
and `Sampling`. One loop, `generate` (fairseq `sequence_generator.py`), owns the decoding state
for all of them: the encoder output, one row per group (a sentence, shared by its K beams; or one
sample of it), the caller-owned KV cache (`model.new_cache()`), whose self-attention part is
reordered by the chosen beams each step, forced prefixes, maximum lengths and finished hypotheses.
Cross-attention keys / values are computed on the first step, once per group. Groups that are done
are dropped from the batch (`cache.reorder` / `cache.reorder_cross` / `EncoderOutput.reorder` with
the surviving rows), so they stop costing compute, and every sentence is decoded exactly as it
would be on its own (padding invariance). Settings come whole in a `DecodeConfig`
(`aiayn.config`, where their defaults and bounds live); `strategy(decode)` picks the search.

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
      fairseq and tensor2tensor do). `Sampling` sums its log-probs in float64.
    * A group that ends with no finite-scored hypothesis (a model whose scores are NaN) raises
      RuntimeError, whatever the strategy.
    * Stopping (fairseq's default, "early stopping"): a sentence is done as soon as it has
      `beam_size` finished hypotheses, even if an active beam could still beat one of them after
      length normalisation; or when it reaches its maximum length. As in fairseq, an EOS candidate
      only finishes a hypothesis when it ranks among the top K candidates of its sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aiayn.config import DecodeConfig

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


# --- strategies (fairseq search.py) --------------------------------------------------------------


class Search:
    """A decoding strategy: how `generate` turns one step's logits into the candidates it keeps
    (fairseq `search.Search`). The loop owns everything else: the cache, finished hypotheses,
    maximum lengths and forced prefixes.

    Each sentence is decoded as `copies` groups (independent samples; 1 otherwise) of `beam_size`
    rows (K). Scores are cumulative log-probs in `score_dtype`.
    """

    beam_size = 1
    copies = 1
    score_dtype = torch.float32

    def start(self, batch: int) -> None:
        """Called once before the first step of a batch of `batch` sentences."""

    def step(self, scores: Tensor, logits: Tensor, at_max: Tensor | None, *, forced: Tensor | None,
             groups: list[int], config) -> tuple[Tensor, Tensor, Tensor]:
        """The candidates of each active group, best first.

        Args:
            scores: cumulative log-probs of the live rows [A, K] (-inf marks an empty beam slot).
            logits: float32 [A*R, V] next-token logits (R = 1 at the first step, else K); may be
                overwritten.
            at_max: bool [A*R], rows that may only produce EOS; None for none.
            forced: long [A*R], the only token each row may produce (a target prefix), -1 = free
                row; None for none.
            groups: the index of each active group (sentence * copies + copy).
            config: the model's config (pad_id, bos_id, eos_id).
        Returns:
            (candidate scores [A, C], beam index [A, C], token id [A, C]), C >= 1.
        """
        raise NotImplementedError


class BeamSearch(Search):
    """The 2K best continuations of each sentence's K beams (`log_prob_step`, or a faster `step`
    with its signature and result, e.g. `aiayn.inference.beam_step_for`)."""

    def __init__(self, beam_size: int, *, step=None) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.beam_size = beam_size
        self.fast_step = step

    def step(self, scores, logits, at_max, *, forced, groups, config):
        ids = {"pad_id": config.pad_id, "bos_id": config.bos_id, "eos_id": config.eos_id}
        if forced is not None:  # only the reference step forces tokens
            return log_prob_step(scores, logits, at_max, forced=forced, **ids)
        return (self.fast_step or log_prob_step)(scores, logits, at_max, **ids)


class GreedySearch(Search):
    """The most probable next token of each sentence: beam 1 without the log-softmax over the
    vocabulary or the top-2K (the argmax of the masked logits is that of the log-probs)."""

    def step(self, scores, logits, at_max, *, forced, groups, config):
        log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # [A, 1], before masking
        _mask_tokens(logits, at_max, pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
        if forced is not None:
            _force_tokens(logits, forced)
        tokens = logits.argmax(dim=-1, keepdim=True)  # [A, 1]
        return scores + (logits.gather(1, tokens) - log_normaliser), torch.zeros_like(tokens), tokens


class Sampling(Search):
    """Random sampling: `samples` independent translations per sentence, each token drawn from
    `filter_distribution` of the model's next-token log-probs.

    Sample k of sentence b has its own group (and memory row) and its own generator, seeded with
    `seeds[b]` and k, so the same seed gives the same samples, and batching (which sentences share
    a batch, in which order) never changes them. Scores are the model's own (temperature 1, no
    cut), summed in float64.

    Raises:
        ValueError: a bad setting (samples < 1, topk < 0, topp outside (0, 1], temperature <= 0).
    """

    score_dtype = torch.float64

    def __init__(self, *, seeds: list[int], samples: int, topk: int, topp: float, temperature: float) -> None:
        if samples < 1 or topk < 0 or not 0.0 < topp <= 1.0 or not temperature > 0:
            raise ValueError(f"bad sampling settings: samples {samples}, topk {topk}, topp {topp}, "
                             f"temperature {temperature}")
        self.seeds, self.copies = list(seeds), samples
        self.topk, self.topp, self.temperature = topk, topp, temperature
        self.generators = [torch.Generator().manual_seed((seed * 1_000_003 + k) % (1 << 63))
                           for seed in self.seeds for k in range(samples)]

    def start(self, batch: int) -> None:
        if len(self.seeds) != batch:
            raise ValueError(f"sampling needs one seed per sentence: {len(self.seeds)} for {batch}")

    def step(self, scores, logits, at_max, *, forced, groups, config):
        log_probs = _mask_tokens(torch.log_softmax(logits, dim=-1), at_max,
                                 pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
        probs = filter_distribution(log_probs, topk=self.topk, topp=self.topp, temperature=self.temperature)
        if forced is not None:  # inside its prefix, a row's next token is given, with its log-prob
            forced_rows = (forced >= 0).nonzero().squeeze(1)
            probs[forced_rows] = 0.0
            probs[forced_rows, forced[forced_rows]] = 1.0
        tokens = _draw(probs, [self.generators[g] for g in groups])[:, None]  # [A, 1]
        return scores + log_probs.gather(1, tokens).to(scores.dtype), torch.zeros_like(tokens), tokens


def strategy(decode: DecodeConfig, *, step=None, seeds: list[int] | None = None) -> Search:
    """The search `decode` asks for: `Sampling` (one seed per sentence) or `BeamSearch` (with the
    beam step `step`; None = `log_prob_step`)."""
    if decode.sampling:
        if seeds is None:
            raise ValueError("sampling needs one seed per sentence")
        return Sampling(seeds=seeds, samples=decode.nbest, topk=decode.sampling_topk, topp=decode.sampling_topp,
                        temperature=decode.temperature)
    return BeamSearch(decode.beam_size, step=step)


# --- the loop (fairseq sequence_generator.py) ----------------------------------------------------


@torch.no_grad()
def generate(
    model, src_tokens: Tensor, decode: DecodeConfig, search: Search, *,
    prefix: list[list[int]] | None = None, encoder_out=None,
) -> list[list[Hypothesis]]:
    """Decode `src_tokens` with `search`, incrementally with the KV cache (the conventions are in
    the module docstring).

    Args:
        model: a `Transformer` (or anything with encode / decode / new_cache / config).
        src_tokens: LongTensor [B, S], right-padded with pad_id, no BOS / EOS.
        decode: length_penalty, max_len_a / max_len_b (max output length = floor(a * source
            length + b) per row) and nbest (hypotheses returned per sentence) are read here; the
            strategy's own settings are in `search` (`strategy(decode)`).
        search: the strategy (`BeamSearch`, `GreedySearch`, `Sampling`).
        prefix: per sentence, the token ids every hypothesis must start with (target prefix, as
            CTranslate2's target_prefix): while a sentence is inside its prefix, only the next
            prefix token may follow (with its own log-prob: scores stay those of the model), and
            its maximum length is at least the prefix's.
        encoder_out: `model.encode(src_tokens)` if the caller already has it.
    Returns:
        B lists of hypotheses sorted by score, descending: `nbest` of them, or fewer where fewer
        exist (a maximum length of 0 leaves only the empty translation). Tokens include the prefix.
    Raises:
        ValueError: a bad prefix, or settings the strategy refuses.
        RuntimeError: a sentence ends with no hypothesis (NaN / -inf scores everywhere).
    """
    alpha = decode.length_penalty
    config = model.config
    eos = config.eos_id
    batch, beam, copies = src_tokens.size(0), search.beam_size, search.copies
    device = src_tokens.device
    search.start(batch)

    prefix = _check_prefix(prefix, batch, config)
    max_lens = max_output_lengths(model, src_tokens, decode.max_len_a, decode.max_len_b).tolist()  # [B]
    if prefix is not None:
        max_lens = [max(length, len(tokens)) for length, tokens in zip(max_lens, prefix)]
    # A group is what `search` keeps K rows for: a sentence (beam search: its K beams share one
    # memory row, so the decoder's cross-attention reads and caches it once for all of them), or
    # one of its `copies` independent samples (a memory row each: they finish at different steps).
    if encoder_out is None:
        encoder_out = model.encode(src_tokens)
    owner = [sentence for sentence in range(batch) for _ in range(copies)]  # sentence of each group
    if copies > 1:
        encoder_out = encoder_out.reorder(torch.tensor(owner, dtype=torch.long, device=device))
    max_len_of = [max_lens[sentence] for sentence in owner]
    group_prefix = None if prefix is None else [prefix[sentence] for sentence in owner]
    cache = model.new_cache()
    # Bookkeeping per active group in Python lists (cheaper than tensor ops at small batches).
    groups = list(range(batch * copies))  # original index of each active group [A]
    finished: list[list[Hypothesis]] = [[] for _ in groups]
    # All beams start identical (BOS), so only slot 0 is live at first, and the first decoder step
    # runs once per group (R = 1 row per group); from the second step on R = K.
    scores = torch.full((len(groups), beam), float("-inf"), dtype=search.score_dtype, device=device)  # [A, K]
    scores[:, 0] = 0.0
    history = [[config.bos_id] for _ in groups]  # [A*R] rows of BOS + tokens
    last_tokens = torch.full((len(groups), 1), config.bos_id, dtype=torch.long, device=device)  # [A*R, 1]
    position = 0  # of the token each step decodes
    while groups:
        active = len(groups)
        rows_per_group = 1 if position == 0 else beam
        at_max = [max_len_of[g] <= position for g in groups]
        at_max_rows = (  # [A*R] or None
            torch.tensor(at_max, device=device).repeat_interleave(rows_per_group) if any(at_max) else None
        )
        logits = model.decode(last_tokens, encoder_out, cache=cache).logits[:, -1].float()  # [A*R, V]
        forced = _forced_tokens(group_prefix, groups, position, rows_per_group, device)  # [A*R] or None
        cand_scores, cand_beams, cand_tokens = search.step(
            scores, logits, at_max_rows, forced=forced, groups=groups, config=config)  # [A, C]

        # The rest of the step is bookkeeping on the candidates of each group, in Python lists.
        keep: list[int] = []  # surviving groups [A']
        rows: list[int] = []  # parent row of each new beam [A'*K]
        next_tokens: list[int] = []  # [A'*K]
        next_scores: list[float] = []  # [A'*K]
        for a, (group, c_scores, c_beams, c_tokens) in enumerate(
            zip(groups, cand_scores.tolist(), cand_beams.tolist(), cand_tokens.tolist())
        ):
            hyps = finished[group]
            # One row per group at the first step (R = 1): every candidate's parent is that row.
            parents = [a * rows_per_group + (b if rows_per_group > 1 else 0) for b in c_beams]
            # Finish the hypotheses whose EOS ranks among the top K candidates.
            for c in range(min(beam, len(c_tokens))):
                if c_tokens[c] == eos and c_scores[c] > _NEG_INF and len(hyps) < beam:
                    tokens = history[parents[c]][1:]
                    hyps.append(Hypothesis(tokens, c_scores[c] / _lp(len(tokens) + 1, alpha), c_scores[c]))
            # The next beam: the K best candidates that are not EOS (beam search: there are at
            # least K of the 2K).
            chosen = [c for c, token in enumerate(c_tokens) if token != eos][:beam]
            if len(chosen) < beam:  # a tiny vocabulary or a final EOS: EOS candidates fill dead slots (-inf)
                chosen += [c for c, token in enumerate(c_tokens) if token == eos][: beam - len(chosen)]
            live = [c_scores[c] if c_tokens[c] != eos else _NEG_INF for c in chosen]
            if len(hyps) >= beam or at_max[a] or not any(score > _NEG_INF for score in live):
                continue  # done: it leaves the batch
            keep.append(a)
            rows += [parents[c] for c in chosen]
            next_tokens += [c_tokens[c] for c in chosen]
            next_scores += live

        groups = [groups[a] for a in keep]
        if not groups:
            break
        if rows != list(range(active * rows_per_group)):  # beams move within a group (or leave)
            cache.reorder(torch.tensor(rows, device=device), include_cross=False)
        if len(keep) < active:  # finished groups leave the memory and its caches
            keep_index = torch.tensor(keep, device=device)
            encoder_out = encoder_out.reorder(keep_index)
            cache.reorder_cross(keep_index)
        history = [history[row] + [token] for row, token in zip(rows, next_tokens)]
        last_tokens = torch.tensor(next_tokens, device=device).view(-1, 1)
        scores = torch.tensor(next_scores, dtype=search.score_dtype, device=device).view(len(keep), beam)
        position += 1

    for group, hyps in enumerate(finished):
        if not hyps:  # only when every score is NaN / -inf: the maximum length forces EOS otherwise
            raise RuntimeError(
                f"the search found no hypothesis with a finite score for sentence {owner[group]} of the batch: "
                "the model's scores are NaN or -inf (a diverged or damaged model?)"
            )
    return [sorted((hyp for group in range(sentence * copies, (sentence + 1) * copies) for hyp in finished[group]),
                   key=lambda h: h.score, reverse=True)[: decode.nbest]
            for sentence in range(batch)]


# --- the searches by name -------------------------------------------------------------------------


def beam_search(
    model, src_tokens: Tensor, *, beam_size: int = DecodeConfig.beam_size,
    length_penalty: float = DecodeConfig.length_penalty, max_len_a: float = DecodeConfig.max_len_a,
    max_len_b: int = DecodeConfig.max_len_b, nbest: int = DecodeConfig.nbest, step=None,
    prefix: list[list[int]] | None = None,
) -> list[list[Hypothesis]]:
    """`generate` with `BeamSearch(beam_size, step=step)` (beam_size 1 equals greedy search).

    Raises:
        ValueError: settings `DecodeConfig` refuses (beam_size < 1, nbest outside [1, beam_size],
            length_penalty < 0, ...).
    """
    decode = DecodeConfig(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                          max_len_b=max_len_b, nbest=nbest)
    return generate(model, src_tokens, decode, BeamSearch(beam_size, step=step), prefix=prefix)


def greedy_search(
    model, src_tokens: Tensor, *, max_len_a: float = DecodeConfig.max_len_a, max_len_b: int = DecodeConfig.max_len_b,
    encoder_out=None,
) -> list[list[int]]:
    """`generate` with `GreedySearch`: B lists of token ids, without BOS / EOS."""
    decode = DecodeConfig(beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b)
    return [hyps[0].tokens for hyps in generate(model, src_tokens, decode, GreedySearch(), encoder_out=encoder_out)]


def sample_search(model, src_tokens: Tensor, decode: DecodeConfig, *, seeds: list[int],
                  prefix: list[list[int]] | None = None) -> list[list[Hypothesis]]:
    """`generate` with `Sampling` as `decode` sets it: decode.nbest samples per sentence, sorted
    by score; `seeds`: one per sentence.

    Raises:
        ValueError: `decode` does not sample, or not one seed per sentence.
    """
    if not decode.sampling:
        raise ValueError("sample_search needs a DecodeConfig that samples (sampling_topk != 1 or sampling_topp < 1)")
    return generate(model, src_tokens, decode, strategy(decode, seeds=seeds), prefix=prefix)


# --- sampling -----------------------------------------------------------------------------------


def filter_distribution(log_probs: Tensor, *, topk: int = 0, topp: float = 1.0, temperature: float = 1.0) -> Tensor:
    """The distribution a sample is drawn from: softmax(log_probs / temperature), cut to the `topk`
    most probable tokens (0 = all) and then to the smallest set whose probability reaches `topp`
    (nucleus sampling, Holtzman et al. 2020), renormalised. [N, V] -> probabilities [N, V] float64.
    Ties at the cut keep the lower token ids (a stable sort), so the result is deterministic."""
    scores = log_probs.double()
    # Shifted to a maximum of 0 before the division: a tiny temperature (5e-324) then gives 0 for
    # the best token and -inf for the rest (greedy, its limit) instead of inf - inf = NaN.
    top = scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax((scores - torch.where(torch.isfinite(top), top, 0.0)) / temperature, dim=-1)  # [N, V]
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
