"""Exports to Hugging Face Marian and CTranslate2 compute aiayn's function (aiayn.export).

A tiny model (its own tokenizer, trained for a few seconds, in a temp dir) is exported and run through each library's
ordinary user path: MarianTokenizer + generate, and CTranslate2 translate_batch on SentencePiece
pieces. Numbers are compared: teacher-forced logits / log-probs, and greedy and beam outputs
token for token on a few dozen sentences.
"""

from pathlib import Path

import pytest
import torch

from aiayn.files.checkpoint import load_model, save_model
from aiayn.config import ModelConfig
from aiayn.export import (
    ctranslate2_length_penalty,
    export,
    marian_length_penalty,
    residual_permutation,
)
from aiayn.model.transformer import Transformer, sinusoidal_table
from aiayn.decoding.search import beam_search, max_output_lengths
from aiayn.files.tokenizer import Tokenizer
from conftest import tiny_pairs

SENTENCES = 40


def train_briefly(model: Transformer, tokenizer: Tokenizer, sources: list[str], targets: list[str]) -> Transformer:
    """150 Adam updates of teacher forcing (a few seconds), so that outputs end by themselves.

    Untrained, a model emits EOS about once in V steps: every output would run to its maximum
    length, where the libraries' conventions differ by design (HF forces EOS with score 0,
    CTranslate2 cuts the output), and <pad> / <s> would keep a real probability, which
    CTranslate2 renormalises away when it suppresses them (aiayn masks them after the log-softmax).
    """
    torch.manual_seed(0)
    src, tgt = tokenizer.encode_batch(sources), tokenizer.encode_batch(targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(150):
        rows = slice(step * 30 % len(src), step * 30 % len(src) + 30)
        tgt_in = padded([[model.config.bos_id] + row for row in tgt[rows]])  # [B, T]
        gold = padded([row + [model.config.eos_id] for row in tgt[rows]])  # [B, T]
        logits = model(padded(src[rows]), tgt_in)  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine OpenMP threads waiting for
    each other (torch's and CTranslate2's in one process) make these tests 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tiny_tokenizer: Tokenizer) -> tuple[Tokenizer, list[str], list[str]]:
    """A 300-piece tokenizer, the sentences to translate, and 300 pairs to train on."""
    pairs = tiny_pairs()
    return tiny_tokenizer, pairs.src[300:300 + SENTENCES], (pairs.src[:300], pairs.tgt[:300])


def make_model_dir(directory: Path, tokenizer: Tokenizer, train: tuple[list[str], list[str]] | None = None,
                   **overrides) -> Path:
    """A `tiny` model (trained briefly on `train` where given) saved as a model directory."""
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_positions=256, **overrides)
    torch.manual_seed(0)
    model = Transformer(config)
    if train is not None:
        train_briefly(model, tokenizer, *train)
    return save_model(model, tokenizer, directory, {"src_lang": "de", "tgt_lang": "en"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, corpus) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"), corpus[0], corpus[2])


def padded(rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    batch = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)  # [B, S]
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    return batch


def aiayn_outputs(model: Transformer, sources: list[list[int]], beam: int, alpha: float) -> list[list[int]]:
    """aiayn's best output per source, and a check that none reached its maximum length (where the
    libraries' conventions differ by design)."""
    src_tokens = padded(sources, model.config.pad_id)
    hypotheses = beam_search(model, src_tokens, beam_size=beam, length_penalty=alpha)
    best = [hyps[0].tokens for hyps in hypotheses]
    limits = max_output_lengths(model, src_tokens, 1.0, 50).tolist()
    assert all(len(tokens) < limit for tokens, limit in zip(best, limits)), "an output ran to its maximum length"
    assert len({len(tokens) for tokens in best}) > 3, "the outputs should have varied lengths"
    return best


# --- Hugging Face Marian -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def marian_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="exporting to Marian needs the optional extra aiayn[bench]")
    return export(model_dir, "marian", tmp_path_factory.mktemp("export") / "marian")


def test_residual_permutation_turns_the_interleaved_table_into_marians():
    pytest.importorskip("transformers", reason="exporting to Marian needs the optional extra aiayn[bench]")
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    marian = MarianSinusoidalPositionalEmbedding(64, 32).create_weight()  # [64, 32], [sin | cos]
    ours = sinusoidal_table(64, 32)  # interleaved
    assert torch.allclose(ours[:, residual_permutation(32)], marian, atol=1e-6)
    assert not torch.allclose(ours, marian, atol=1e-2)  # the layouts do differ


@pytest.mark.slow
def test_marian_export_computes_the_same_logits(model_dir: Path, marian_dir: Path, corpus):
    from transformers import MarianMTModel

    model, tokenizer, _ = load_model(model_dir)
    hf_model = MarianMTModel.from_pretrained(marian_dir).eval()
    sources = tokenizer.encode_batch(corpus[1][:8])
    targets = tokenizer.encode_batch(corpus[1][8:16])
    src_tokens = padded(sources)
    tgt_tokens = padded([[model.config.bos_id] + row for row in targets])  # [B, T]
    with torch.no_grad():
        ours = model(src_tokens, tgt_tokens)  # [B, T, V]
        theirs = hf_model(input_ids=src_tokens, attention_mask=src_tokens != 0, decoder_input_ids=tgt_tokens,
                          decoder_attention_mask=tgt_tokens != 0).logits
    real = tgt_tokens != 0  # compare the positions that are not padding
    assert (ours - theirs)[real].abs().max().item() < 1e-4


@pytest.mark.slow
def test_marian_tokenizer_gives_aiayn_pieces_without_special_tokens(model_dir: Path, marian_dir: Path, corpus):
    from transformers import MarianTokenizer

    _, tokenizer, _ = load_model(model_dir)
    hf_tokenizer = MarianTokenizer.from_pretrained(marian_dir)
    sentences = corpus[1]
    assert hf_tokenizer(sentences, add_special_tokens=False).input_ids == tokenizer.encode_batch(sentences)
    # Marian's default: every source ends with </s>, which aiayn's sources never carry.
    assert hf_tokenizer(sentences).input_ids == [ids + [3] for ids in tokenizer.encode_batch(sentences)]


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 4])
def test_marian_generate_reproduces_aiayn(model_dir: Path, marian_dir: Path, corpus, beam: int):
    """Greedy, and beam 4 without length penalty (alpha = 0 is beta = 0: the one length penalty both
    forms share), token for token, on a padded batch."""
    from transformers import MarianMTModel, MarianTokenizer

    model, tokenizer, _ = load_model(model_dir)
    expected = aiayn_outputs(model, tokenizer.encode_batch(corpus[1]), beam, alpha=0.0)
    hf_model = MarianMTModel.from_pretrained(marian_dir).eval()
    hf_tokenizer = MarianTokenizer.from_pretrained(marian_dir)
    inputs = hf_tokenizer(corpus[1], add_special_tokens=False, padding=True, return_tensors="pt")
    longest = inputs.input_ids.size(1)
    with torch.no_grad():
        generated = hf_model.generate(**inputs, num_beams=beam, length_penalty=marian_length_penalty(0.0),
                                      max_length=longest + 52)  # start + S + 50 pieces + EOS
    assert generated[:, 0].eq(model.config.bos_id).all()  # starts from <s>, like aiayn
    outputs = [[t for t in row[1:] if t not in (model.config.eos_id, model.config.pad_id)]
               for row in generated.tolist()]
    assert outputs == expected


# --- CTranslate2 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctranslate2():
    return pytest.importorskip("ctranslate2", reason="exporting to CTranslate2 needs the optional extra aiayn[bench]")


def pieces_of(tokenizer: Tokenizer, rows: list[list[int]]) -> list[list[str]]:
    return [tokenizer.pieces(row) for row in rows]


@pytest.mark.parametrize("overrides", [
    {},
    {"norm_first": True, "positional_encoding": "learned", "share_embeddings": False},
], ids=["paper", "pre-norm-learned-unshared"])
def test_ctranslate2_export_scores_like_aiayn(tmp_path: Path, corpus, ctranslate2, overrides):
    model_dir = make_model_dir(tmp_path / "model", corpus[0], **overrides)
    out = export(model_dir, "ctranslate2", tmp_path / "ct2")
    model, tokenizer, _ = load_model(model_dir)
    sources = tokenizer.encode_batch(corpus[1][:8])
    targets = tokenizer.encode_batch(corpus[1][8:16])
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    results = translator.score_batch(pieces_of(tokenizer, sources), pieces_of(tokenizer, targets))
    for source, target, result in zip(sources, targets, results):
        with torch.no_grad():
            logits = model(torch.tensor([source]), torch.tensor([[model.config.bos_id] + target]))[0]  # [T, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        expected = log_probs[torch.arange(len(target) + 1), torch.tensor(target + [model.config.eos_id])]
        assert torch.allclose(torch.tensor(result.log_probs), expected, atol=1e-4)


@pytest.mark.slow  # model_dir trains for about 6 s
@pytest.mark.parametrize("beam", [1, 4])
def test_ctranslate2_translate_batch_reproduces_aiayn(model_dir: Path, tmp_path: Path, corpus, ctranslate2, beam):
    """Greedy, and beam 4 without length penalty, token for token, on SentencePiece pieces (alpha = 0
    maps to a tiny beta, not 0, which would switch CTranslate2 to another stopping rule)."""
    out = export(model_dir, "ctranslate2", tmp_path / "ct2")
    model, tokenizer, _ = load_model(model_dir)
    sources = tokenizer.encode_batch(corpus[1])
    expected = aiayn_outputs(model, sources, beam, alpha=0.0)
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    results = translator.translate_batch(
        pieces_of(tokenizer, sources), beam_size=beam, length_penalty=ctranslate2_length_penalty(0.0),
        max_decoding_length=max(map(len, sources)) + 50, suppress_sequences=[["<pad>"], ["<s>"]],
    )
    vocabulary = {piece: i for i, piece in enumerate(tokenizer.pieces(range(tokenizer.vocab_size)))}
    assert [[vocabulary[piece] for piece in result.hypotheses[0]] for result in results] == expected


@pytest.mark.slow  # model_dir trains for about 6 s
def test_ctranslate2_int8_export_is_quantized(model_dir: Path, tmp_path: Path, corpus, ctranslate2):
    fp32 = export(model_dir, "ctranslate2", tmp_path / "fp32")
    int8 = export(model_dir, "ctranslate2", tmp_path / "int8", quantization="int8")
    # Linear weights at 1 byte instead of 4 (embeddings and LayerNorms stay float32).
    assert (int8 / "model.bin").stat().st_size < 0.6 * (fp32 / "model.bin").stat().st_size
    _, tokenizer, _ = load_model(model_dir)
    translator = ctranslate2.Translator(str(int8), device="cpu", compute_type="int8", intra_threads=1)
    sources = pieces_of(tokenizer, tokenizer.encode_batch(corpus[1][:4]))
    assert all(result.hypotheses[0] for result in translator.translate_batch(sources, max_decoding_length=20))


# --- refusals and the command ------------------------------------------------------------------


@pytest.mark.parametrize("target, overrides, words", [
    ("marian", {"positional_encoding": "learned"}, "save_pretrained drops it"),
    ("marian", {"norm_first": True}, "post-LN only"),
    ("marian", {"positional_encoding": "rope"}, "positional_encoding='rope'"),
    ("ctranslate2", {"positional_encoding": "alibi"}, "positional_encoding='alibi'"),
    ("ctranslate2", {"positional_encoding": "relative"}, "positional_encoding='relative'"),
    ("ctranslate2", {"positional_encoding": "none"}, "positional_encoding='none'"),
])
def test_export_refuses_what_the_target_cannot_represent(tmp_path: Path, corpus, target, overrides, words):
    model_dir = make_model_dir(tmp_path / "model", corpus[0], **overrides)
    with pytest.raises(ValueError, match=words):
        export(model_dir, target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # model_dir trains for about 6 s
def test_export_refuses_a_non_empty_out_unless_overwrite(model_dir: Path, tmp_path: Path, ctranslate2):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(model_dir, "ctranslate2", out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="ctranslate2 only"):
        export(model_dir, "marian", tmp_path / "other", quantization="int8")
    export(model_dir, "ctranslate2", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.bin", "shared_vocabulary.json",
                                                    "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.slow  # model_dir trains for about 6 s
def test_cli_export(model_dir: Path, tmp_path: Path, capsys):
    pytest.importorskip("transformers", reason="exporting to Marian needs the optional extra aiayn[bench]")
    from transformers import MarianMTModel

    from aiayn.cli import main

    assert main(["export", "--model", str(model_dir), "--to", "marian", "--out", str(tmp_path / "m")]) == 0
    assert "marian" in capsys.readouterr().out
    assert MarianMTModel.from_pretrained(tmp_path / "m").config.decoder_start_token_id == 2
    assert main(["export", "--model", str(model_dir), "--to", "marian", "--out", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
