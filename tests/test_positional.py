"""Positional encodings: every kind checked against numbers, not shapes.

sinusoidal, learned (added to the embeddings), rope, alibi, relative (inside self-attention), none.
"""

import math
from pathlib import Path

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.model.attention import (
    KVCache,
    MultiHeadAttention,
    add_bias,
    alibi_bias,
    alibi_slopes,
    causal_mask,
    fast_attention,
    padding_mask,
    reference_attention,
    relative_bias,
    relative_indices,
    rotate,
    scaled_dot_product_attention,
)
from aiayn.config import POSITIONAL_ENCODINGS
from aiayn.inference import prepare
from aiayn.inference.attention import cpu_attention, summed_attention
from aiayn.model.transformer import RELATIVE_DISTANCE
from aiayn.decoding.search import beam_search

PAD = 0
KINDS = list(POSITIONAL_ENCODINGS)
IN_ATTENTION = ["rope", "alibi", "relative"]


def tiny_model(kind: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", positional_encoding=kind, **overrides)
    model = Transformer(config).eval()
    if kind == "relative":  # a random table as large as a trained one, so that it matters
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, MultiHeadAttention) and module.relative_keys is not None:
                    module.relative_keys.normal_(0.0, 1.0)
    return model


def random_tokens(batch: int, length: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- configuration ------------------------------------------------------------------------------


def test_config_accepts_every_kind_and_names_a_bad_one():
    assert KINDS == ["sinusoidal", "learned", "rope", "alibi", "relative", "none"]
    assert ModelConfig().positional_encoding == "sinusoidal"  # the paper's stays the default
    with pytest.raises(ValueError, match="positional_encoding.*'rotary'"):
        ModelConfig.preset("tiny", positional_encoding="rotary")
    with pytest.raises(ValueError, match="positions must be one of"):
        MultiHeadAttention(d_model=8, n_heads=2, positions="sinusoidal")
    with pytest.raises(ValueError, match="rope needs an even head dimension, got 3"):
        MultiHeadAttention(d_model=6, n_heads=2, positions="rope")


def test_only_the_added_kinds_have_a_table_and_only_relative_has_new_weights():
    shapes = {kind: {n: tuple(p.shape) for n, p in tiny_model(kind).state_dict().items()} for kind in KINDS}
    assert "positions.weight" in shapes["learned"]
    for kind in IN_ATTENTION + ["none"]:
        assert tiny_model(kind).positions is None
    relative = {n: s for n, s in shapes["relative"].items() if "relative_keys" in n}
    # One a^K table per self-attention layer (2 encoder + 2 decoder), shared by the heads.
    assert sorted(relative) == [f"{side}_layers.{i}.self_attn.relative_keys" for side in ("decoder", "encoder")
                                for i in range(2)]
    assert set(relative.values()) == {(2 * RELATIVE_DISTANCE + 1, 8)}
    for kind in ("sinusoidal", "rope", "alibi", "none"):  # same weights as the paper's model
        assert shapes[kind] == shapes["sinusoidal"]


# --- RoPE ---------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i: int, j: int) -> float:
        return (rotate(q, torch.tensor([i])) @ rotate(k, torch.tensor([j])).transpose(-2, -1)).item()

    for i, j in [(0, 0), (3, 1), (1, 3), (10, 2)]:
        for shift in (1, 7, 500):
            assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-9)
    assert abs(score(3, 1) - score(1, 3)) > 1e-3  # direction matters: not a function of |i - j|
    # A rotation: norms kept; position 0 is the identity; pairs rotated by pos * 10000^(-2i/D).
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    positions = torch.arange(5)
    assert torch.allclose(rotate(x, positions).norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rotate(x, torch.zeros(5, dtype=torch.long)), x)
    pair = torch.tensor([1.0, 0.0] * 8, dtype=torch.float64).view(1, 1, 1, 16)
    rotated = rotate(pair, torch.tensor([2]))[0, 0, 0]
    theta_1 = 10000.0 ** (-2 / 16)
    assert rotated[2].item() == pytest.approx(math.cos(2 * theta_1))
    assert rotated[3].item() == pytest.approx(math.sin(2 * theta_1))


def test_rope_caches_keys_rotated_at_their_absolute_positions():
    torch.manual_seed(1)
    attention = MultiHeadAttention(d_model=16, n_heads=2, positions="rope").eval()
    x = torch.randn(2, 5, 16)
    _, full_keys, _ = attention.heads(x)
    cache = KVCache()
    attention.heads(x[:, :3], cache=cache)  # three positions at once, then one at a time
    for t in (3, 4):
        q, _, _ = attention.heads(x[:, t : t + 1], cache=cache)
    assert cache.length == 5
    torch.testing.assert_close(cache.keys, full_keys)
    raw_q = attention._split_heads(attention.in_proj.query(x[:, 4:5]))
    torch.testing.assert_close(q, rotate(raw_q, torch.tensor([4])))


# --- ALiBi --------------------------------------------------------------------------------------


def test_alibi_slopes_follow_press_et_al():
    assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # Not a power of 2: the 4-head slopes, then every other slope of the 8-head ones.
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_alibi_bias_at_known_distances_with_and_without_a_cache():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, torch.arange(5), torch.arange(5))  # [H, L, M]
    assert bias[0, 4, 1].item() == -0.25 * 3  # m_1 = 1/4, distance 3
    assert bias[3, 0, 4].item() == -(2.0**-8) * 4  # the encoder looks ahead with the same penalty
    assert torch.equal(bias, bias.transpose(1, 2))
    assert torch.equal(bias.diagonal(dim1=1, dim2=2), torch.zeros(4, 5))
    # Incremental decoding: the new query at position 4 against the 5 cached keys.
    attention = MultiHeadAttention(d_model=16, n_heads=4, positions="alibi")
    step = attention.position_bias(torch.randn(2, 4, 1, 4), key_len=5)
    assert step.shape == (1, 4, 1, 5)
    assert step[0, 1, 0].tolist() == [-(2.0**-4) * d for d in (4, 3, 2, 1, 0)]
    torch.testing.assert_close(step[0, :, 0], bias[:, 4])


# --- relative (Shaw et al.) ---------------------------------------------------------------------


def test_relative_bias_at_known_distances_with_and_without_a_cache():
    k = 2
    index = relative_indices(torch.arange(6), torch.arange(6), k)
    assert index[0].tolist() == [2, 3, 4, 4, 4, 4]  # j - i = 0, 1, 2, clipped at 2
    assert index[5].tolist() == [0, 0, 0, 0, 1, 2]
    torch.manual_seed(2)
    table = torch.randn(2 * k + 1, 4, dtype=torch.float64)
    q = torch.randn(1, 3, 6, 4, dtype=torch.float64)
    bias = relative_bias(q, table, torch.arange(6), torch.arange(6))  # [B, H, L, M]
    for head, i, j in [(0, 0, 0), (1, 4, 1), (2, 1, 5), (0, 5, 0)]:
        expected = q[0, head, i] @ table[min(max(j - i, -k), k) + k] / 2.0  # / sqrt(D)
        assert bias[0, head, i, j].item() == pytest.approx(expected.item())
    # One query at position 5 against 6 cached keys: the last row of the full bias.
    step = relative_bias(q[:, :, 5:], table, torch.tensor([5]), torch.arange(6))
    torch.testing.assert_close(step[:, :, 0], bias[:, :, 5])


# --- fast path == reference with a bias ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["alibi", "relative"])
@pytest.mark.parametrize("queries", [1, 4, 6])
def test_fast_paths_equal_the_reference_with_a_position_bias(kind, queries):
    torch.manual_seed(3)
    attention = MultiHeadAttention(d_model=16, n_heads=2, positions=kind)
    if kind == "relative":
        torch.nn.init.normal_(attention.relative_keys)
    q, k, v = torch.randn(2, 2, queries, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, PAD, PAD]])
    mask = padding_mask(tokens, PAD) & causal_mask(queries, 6)
    bias = attention.position_bias(q, key_len=6)
    combined = add_bias(mask, bias)
    assert combined.dtype == torch.float32
    ref_out, ref_weights = reference_attention(q, k, v, combined)
    assert ref_weights[1, :, :, 4:].abs().max().item() == 0.0  # masked keys get exactly 0
    # The bias is really there: without it the outputs differ.
    assert max_diff(reference_attention(q, k, v, mask)[0], ref_out) > 1e-3
    for name, out in [
        ("fast_attention", fast_attention(q, k, v, combined)),
        ("scaled_dot_product_attention", scaled_dot_product_attention(q, k, v, combined)[0]),
        ("cpu_attention", cpu_attention(q, k, v, combined, incremental=True)[0]),
        ("summed_attention", summed_attention(q, k, v, combined)),
    ]:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_fast_path_equals_the_reference_path(kind):
    # need_weights=True runs the written-out attention; False the fused kernel.
    model = tiny_model(kind)
    src, tgt = random_tokens(2, 7), random_tokens(2, 6)
    src[1, -3:] = PAD
    encoder_out = model.encode(src)
    fast = model.decode(tgt, encoder_out).logits
    reference = model.decode(tgt, model.encode(src, need_weights=True), need_weights=True)
    torch.testing.assert_close(fast, reference.logits, rtol=1e-5, atol=1e-5)
    for weights in reference.self_attention:  # attention maps: rows sum to 1, the future gets 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
        assert weights.triu(1).abs().max().item() == 0.0


# --- the whole model: causality, padding, cache, beam search, save / load ----------------------


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    model = tiny_model(kind)
    src, tgt = random_tokens(2, 6), random_tokens(2, 8)
    logits = model(src, tgt)
    for t in range(7):
        changed = tgt.clone()
        changed[:, t + 1 :] = random_tokens(2, 7 - t)
        changed_logits = model(src, changed)
        assert max_diff(logits[:, : t + 1], changed_logits[:, : t + 1]) < 1e-5
        assert max_diff(logits[:, t + 1 :], changed_logits[:, t + 1 :]) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_padding_a_source_or_a_batch_neighbour_changes_no_real_logit(kind):
    model = tiny_model(kind)
    src, tgt = random_tokens(1, 5), random_tokens(1, 6)
    alone = model(src, tgt)
    padded_src = torch.cat([src, torch.full((1, 4), PAD)], dim=1)
    assert max_diff(model(padded_src, tgt), alone) < 1e-5
    neighbour_src, neighbour_tgt = random_tokens(1, 9), random_tokens(1, 11)
    batch_src = torch.cat([padded_src, neighbour_src])
    batch_tgt = torch.cat([torch.cat([tgt, torch.full((1, 5), PAD)], dim=1), neighbour_tgt])
    batched = model(batch_src, batch_tgt)
    assert max_diff(batched[0, :6], alone[0]) < 1e-5
    assert max_diff(batched[1:], model(neighbour_src, neighbour_tgt)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_the_full_forward(kind):
    model = tiny_model(kind)
    src, tgt = random_tokens(3, 7), random_tokens(3, 9)
    src[1, -2:] = PAD
    full = model(src, tgt)
    encoder_out = model.encode(src)
    cache = model.new_cache()
    # Three positions in one call (the cache's multi-query path), then one at a time.
    steps = [model.decode(tgt[:, :3], encoder_out, cache).logits]
    steps += [model.decode(tgt[:, t : t + 1], encoder_out, cache).logits for t in range(3, 9)]
    assert cache.length == 9
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_fast_model_equals_the_plain_model_and_batches_equal_singles(kind):
    model = tiny_model(kind)
    src = random_tokens(3, 8)
    src[0, -3:] = PAD
    plain = beam_search(model, src, beam_size=3, max_len_b=12)
    fast = beam_search(prepare(model, precision="fp32"), src, beam_size=3, max_len_b=12)
    assert [h[0].tokens for h in fast] == [h[0].tokens for h in plain]
    for row in range(3):
        length = int((src[row] != PAD).sum())
        single = beam_search(model, src[row : row + 1, :length], beam_size=3, max_len_b=12)
        assert single[0][0].tokens == plain[row][0].tokens
        assert single[0][0].score == pytest.approx(plain[row][0].score, abs=1e-4)


def test_none_sees_a_bag_of_pieces_and_the_others_see_order():
    src = random_tokens(1, 6)
    order = torch.tensor([2, 0, 1, 5, 3, 4])
    shuffled = src[:, order]
    tgt = random_tokens(1, 5)
    for kind in KINDS:
        model = tiny_model(kind)
        memory = model.encode(src).memory
        shuffled_memory = model.encode(shuffled).memory
        if kind == "none":  # the encoder is permutation-equivariant, so the decoder cannot tell
            assert max_diff(shuffled_memory, memory[:, order]) < 1e-5
            assert max_diff(model(shuffled, tgt), model(src, tgt)) < 1e-5
        else:
            assert max_diff(shuffled_memory, memory[:, order]) > 1e-3, kind


def test_symmetric_alibi_encoder_cannot_tell_a_sentence_from_its_reverse():
    # |i - j| is the same read left to right or right to left, and cross-attention has no
    # positions: the source reversed gives the same translation. The price of the symmetric choice.
    src, tgt = random_tokens(1, 6), random_tokens(1, 5)
    alibi = tiny_model("alibi")
    assert max_diff(alibi.encode(src.flip(1)).memory.flip(1), alibi.encode(src).memory) < 1e-5
    assert max_diff(alibi(src.flip(1), tgt), alibi(src, tgt)) < 1e-5
    for kind in ("sinusoidal", "rope", "relative"):
        model = tiny_model(kind)
        assert max_diff(model(src.flip(1), tgt), model(src, tgt)) > 1e-3, kind


@pytest.mark.parametrize("kind", IN_ATTENTION + ["none"])
def test_max_positions_still_bounds_the_lengths(kind):
    model = tiny_model(kind, max_positions=8)
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(random_tokens(1, 9))


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_the_same_translations(kind, tmp_path):
    from aiayn.files.checkpoint import load_model, save_model
    from aiayn.files.tokenizer import Tokenizer

    lines = [f"das ist satz nummer {n} und noch {n * 7} worte" for n in range(200)]
    tokenizer = Tokenizer.train(lines, 60)
    model = tiny_model(kind, vocab_size=tokenizer.vocab_size)
    save_model(model, tokenizer, tmp_path / kind)
    loaded, _, _ = load_model(tmp_path / kind)
    assert loaded.config.positional_encoding == kind
    src, tgt = random_tokens(2, 6, tokenizer.vocab_size), random_tokens(2, 5, tokenizer.vocab_size)
    assert torch.equal(loaded(src, tgt), model(src, tgt))


def test_bf16_inference_keeps_rope_angles_and_alibi_close_to_fp32():
    for kind in IN_ATTENTION:
        model = tiny_model(kind)
        src, tgt = random_tokens(2, 30), random_tokens(2, 20)
        fp32 = model(src, tgt).log_softmax(-1)
        bf16 = prepare(model, precision="bf16")(src, tgt).float().log_softmax(-1)
        assert max_diff(bf16, fp32) < 0.15, kind


# --- plots --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_positions_plot_of_each_kind(kind, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from aiayn.cli import main
    from aiayn.files.checkpoint import save_model
    from aiayn.files.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([f"ein satz {n} mit {n * 3} worten" for n in range(200)], 40)
    save_model(tiny_model(kind, vocab_size=tokenizer.vocab_size), tokenizer, tmp_path / "model")
    out = tmp_path / "positions.png"
    # In process (the command's own entry point), not a subprocess: the same code, without
    # importing torch again for each kind.
    code = main(["positions", "--model", str(tmp_path / "model"), "--length", "20", "--out", str(out)])
    captured = capsys.readouterr()
    if kind == "none":
        assert code != 0 and "no positional encoding to plot" in captured.err
        assert not out.exists()
    else:
        assert code == 0, captured.err
        assert Path(captured.out.strip()) == out and out.stat().st_size > 1000
