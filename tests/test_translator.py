"""Translator and the `aiayn translate` command on a tiny random model saved to a directory."""

import io
import warnings

import pytest
import torch

from aiayn import ModelConfig, Transformer, hardware
from aiayn.inference import compile as compile_module
from aiayn.inference import prepack
from aiayn.decoding import translator as translator_module
from aiayn.cli import main
from aiayn.config import DecodeConfig
from aiayn.decoding.search import beam_search
from aiayn.files.checkpoint import save_model
from aiayn.decoding.translator import AttentionResult, Translator

MAX_POSITIONS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_positions=MAX_POSITIONS)
    model = Transformer(config).eval()
    directory = tmp_path_factory.mktemp("model")
    save_model(model, tokenizer, directory, {"src_lang": "de", "tgt_lang": "en"})
    return directory


@pytest.fixture(scope="module")
def translator(model_dir):
    return Translator.load(model_dir)


SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "",
    "Zwei Hunde spielen im Schnee auf einer großen Wiese.",
    "   ",
    "Kinder.",
    "Eine Frau in einem roten Kleid singt auf der Bühne.",
]


def test_translate_keeps_order_and_empty_lines(translator):
    if prepack.available():  # on the CPU the fp32 linear layers run pre-packed for oneDNN
        assert isinstance(translator.model.output_projection, prepack.PackedLinear)
        assert not any(isinstance(m, torch.nn.Linear) for m in translator.model.modules())
    out = translator.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8))
    assert len(out) == len(SENTENCES)
    assert out[1] == "" and out[3] == ""
    singles = [translator.translate([s], DecodeConfig(beam_size=2, max_len_b=8))[0] for s in SENTENCES]
    assert out == singles
    assert all(out[i] for i in (0, 2, 4, 5))  # the random model does say something
    # One sentence per batch gives the same again (length sorting and unsorting are consistent).
    assert translator.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8), batch_tokens=1) == out


def test_translate_matches_beam_search_ids(translator):
    sentence = SENTENCES[2]
    ids = translator.tokenizer.encode(sentence)
    hyps = beam_search(translator.model, torch.tensor([ids]), beam_size=3, nbest=3, max_len_b=6)[0]
    scored = translator.translate([sentence], DecodeConfig(beam_size=3, nbest=3, max_len_b=6))[0]
    assert [text for text, _ in scored] == [translator.tokenizer.decode(h.tokens) for h in hyps]
    assert [score for _, score in scored] == pytest.approx([h.score for h in hyps])
    assert [s for _, s in scored] == sorted((s for _, s in scored), reverse=True)
    single = translator.translate([sentence, ""], DecodeConfig(beam_size=3, max_len_b=6), return_scores=True)
    assert single[0] == [scored[0]] and single[1] == [("", 0.0)]


def test_overlong_line_warns_and_is_truncated(translator):
    long_line = " ".join(["Ein Mann mit einem Hut."] * 20)
    assert len(translator.tokenizer.encode(long_line)) > MAX_POSITIONS
    with pytest.warns(UserWarning, match=r"line 2: \d+ source pieces exceed"):
        out = translator.translate(["Kinder.", long_line], DecodeConfig(beam_size=2, max_len_a=2.0, max_len_b=50))
    assert len(out) == 2
    # The same as translating the first max_positions pieces, with no warning; the output is
    # capped at max_positions - 1 pieces although a * S + b = 130.
    ids = translator.tokenizer.encode(long_line)[:MAX_POSITIONS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = beam_search(translator.model, torch.tensor([ids]), beam_size=2, max_len_a=2.0, max_len_b=50)[0][0]
    assert out[1] == translator.tokenizer.decode(best.tokens)
    assert len(best.tokens) == MAX_POSITIONS - 1  # this random model runs to the cap


def test_translate_bf16_casts_weights_once_and_stays_close_to_fp32(model_dir, translator):
    bf16 = Translator.load(model_dir, precision="bf16")
    assert bf16.model.src_embedding.weight.dtype == torch.bfloat16
    linear1 = bf16.model.decoder_layers[0].feed_forward.linear1
    if hardware.detect().onednn_bf16:  # packed bf16 where oneDNN's bf16 kernels run
        assert isinstance(linear1, prepack.PackedLinear) and linear1.dtype == torch.bfloat16
    else:
        assert isinstance(linear1, torch.nn.Linear) and linear1.weight.dtype == torch.bfloat16
    assert bf16.model.positions.table.dtype == torch.float32  # sin / cos kept exact
    out = bf16.translate(SENTENCES[:3], DecodeConfig(beam_size=2, max_len_b=5))
    assert len(out) == 3 and out[1] == ""
    # Teacher-forced log-probs: bf16 weights move them a little, never a lot.
    src = torch.tensor([translator.tokenizer.encode(SENTENCES[0])])
    tgt = torch.tensor([[2] + translator.tokenizer.encode("A man rides a bike.")])
    with torch.inference_mode():
        exact = torch.log_softmax(translator.model(src, tgt).float(), dim=-1)
        approx = torch.log_softmax(bf16.model(src, tgt).float(), dim=-1)
    difference = (exact - approx).abs().max().item()
    assert 0 < difference < 0.1
    with pytest.raises(ValueError, match="precision"):
        Translator.load(model_dir, precision="fp8")


def test_auto_precision_is_fp32_without_native_bf16(model_dir, translator, monkeypatch):
    from test_hardware import AVX2

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    monkeypatch.setattr(translator_module, "decoding_timings", _no_measurement)
    auto = Translator.load(model_dir, precision="auto")
    assert auto.precision == "fp32" and auto.precision_choice.message.startswith("precision auto -> fp32 (no native")
    assert auto.model.src_embedding.weight.dtype == torch.float32
    expected = translator.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8))
    assert auto.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8)) == expected


def _no_measurement(*args, **kwargs):
    raise AssertionError("no measurement where bf16 is not native")


def test_auto_precision_takes_bf16_where_native_and_measured_faster(model_dir, monkeypatch):
    import dataclasses

    from test_hardware import SAPPHIRE_RAPIDS

    # Native bf16 by the CPU's features; oneDNN's bf16 packing as this machine really has it.
    caps = dataclasses.replace(SAPPHIRE_RAPIDS, onednn_bf16=hardware.detect().onednn_bf16)
    monkeypatch.setattr(hardware, "detect", lambda: caps)
    for seconds, expected in (({"fp32": 2.0, "bf16": 1.0}, "bf16"), ({"fp32": 1.0, "bf16": 1.5}, "fp32")):
        monkeypatch.setattr(translator_module, "decoding_timings", lambda *args, seconds=seconds, **kw: seconds)
        auto = Translator.load(model_dir, precision="auto")
        assert auto.precision == expected
        assert auto.model.src_embedding.weight.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]


def test_decoding_timings_measure_copies_and_leave_the_model_alone(model_dir):
    from aiayn.files.checkpoint import load_model

    model, _, _ = load_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = translator_module.decoding_timings(model, "cpu", rows=4, steps=2)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < 60 for s in seconds.values())
    assert all(type(m) is not prepack.PackedLinear for m in model.modules())  # the caller's model not packed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_explicit_bf16_without_native_bf16_warns_and_runs_unpacked(model_dir, translator, monkeypatch):
    from test_hardware import AVX2

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    with pytest.warns(RuntimeWarning, match=r"expect about 30x slower than fp32"):
        bf16 = Translator.load(model_dir, precision="bf16")
    assert bf16.precision == "bf16"
    linear1 = bf16.model.decoder_layers[0].feed_forward.linear1
    assert isinstance(linear1, torch.nn.Linear) and linear1.weight.dtype == torch.bfloat16  # no oneDNN packing
    src = torch.tensor([translator.tokenizer.encode(SENTENCES[0])])
    tgt = torch.tensor([[2] + translator.tokenizer.encode("A man rides a bike.")])
    with torch.inference_mode():
        exact = torch.log_softmax(translator.model(src, tgt).float(), dim=-1)
        approx = torch.log_softmax(bf16.model(src, tgt).float(), dim=-1)
    assert 0 < (exact - approx).abs().max().item() < 0.1
    out = bf16.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=5))
    assert out[1] == "" and all(out[i] for i in (0, 2, 4, 5))


def test_cli_says_once_what_precision_auto_became(model_dir, monkeypatch, capsys):
    from test_hardware import AVX2

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    monkeypatch.setattr("sys.stdin", io.StringIO("Kinder.\n"))
    assert main(["translate", "--model", str(model_dir), "--beam", "2", "--max-len-b", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("precision auto -> fp32 (no native bf16 on this CPU (AMD EPYC 7B13 (Zen 3)))") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("Kinder.\n"))
    assert main(["translate", "--model", str(model_dir), "--beam", "2", "--max-len-b", "4", "--precision", "bf16"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aiayn translate: warning: precision bf16 -> bf16 (this CPU")


def test_attention_shapes_and_rows_sum_to_one(translator):
    config = translator.model.config
    result = translator.attention("Ein Mann fährt Fahrrad.", "A man rides a bike.")
    assert isinstance(result, AttentionResult)
    src = translator.tokenizer.encode("Ein Mann fährt Fahrrad.")
    tgt = translator.tokenizer.encode("A man rides a bike.")
    S, T, H = len(src), len(tgt) + 1, config.n_heads
    assert result.source_tokens == translator.tokenizer.pieces(src)
    assert result.target_input_tokens[0] == "<s>" and result.target_tokens[-1] == "</s>"
    assert result.target_input_tokens[1:] == result.target_tokens[:-1]
    assert result.encoder_self.shape == (config.n_encoder_layers, H, S, S)
    assert result.decoder_self.shape == (config.n_decoder_layers, H, T, T)
    assert result.cross.shape == (config.n_decoder_layers, H, T, S)
    for weights in (result.encoder_self, result.decoder_self, result.cross):
        assert weights.dtype == torch.float32
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    # Decoder self-attention is causal: nothing above the diagonal.
    assert result.decoder_self.triu(diagonal=1).abs().max() == 0
    assert result.translation == translator.tokenizer.decode(tgt)


def test_attention_of_own_translation(translator):
    result = translator.attention("Zwei Hunde spielen.")
    assert result.translation == translator.translate(["Zwei Hunde spielen."], DecodeConfig(beam_size=4))[0]
    assert result.cross.shape[2] == len(result.target_tokens)
    with pytest.raises(ValueError, match="non-empty"):
        translator.attention("  ")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_translate_stdin_stdout(model_dir, translator, monkeypatch, capsys):
    text = "\n".join(SENTENCES) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["translate", "--model", str(model_dir), "--beam", "2", "--max-len-b", "8", "--precision", "fp32"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == ""  # trailing newline
    assert lines[:-1] == translator.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8))


def test_cli_translate_nbest_file(model_dir, translator, tmp_path, capsys):
    source = tmp_path / "in.de"
    source.write_text("Kinder.\n\nEin Hund.\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    args = ["translate", "--model", str(model_dir), "--beam", "3", "--nbest", "2", "--max-len-b", "6",
            "--precision", "fp32", "--input", str(source), "--output", str(output)]
    assert main(args) == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    expected = translator.translate(["Kinder.", "", "Ein Hund."], DecodeConfig(beam_size=3, nbest=2, max_len_b=6))
    assert lines == [f"{i} ||| {text} ||| {score:.4f}" for i, entries in enumerate(expected) for text, score in entries]
    assert [line.split(" ||| ")[0] for line in lines] == ["0", "0", "1", "2", "2"]


def test_cli_translate_bad_model_dir(tmp_path, capsys):
    assert main(["translate", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_int8_without_vnni_translates_in_fp32_with_a_warning(model_dir, translator, monkeypatch):
    from test_hardware import AVX2

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    with pytest.warns(RuntimeWarning, match="has no VNNI: .* so fp32 runs instead"):
        fallback = Translator.load(model_dir, precision="int8")
    assert fallback.precision == "fp32"
    decode = DecodeConfig(beam_size=2, max_len_b=8)
    assert fallback.translate(SENTENCES, decode) == translator.translate(SENTENCES, decode)


@pytest.mark.skipif(not hardware.detect().cpu_vnni,
                    reason="int8 needs VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8); this CPU runs int8 requests in fp32")
def test_translate_int8_quantises_linear_layers_and_keeps_alignment(model_dir, translator):
    int8 = Translator.load(model_dir, precision="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    out = int8.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=5))
    assert len(out) == len(SENTENCES) and out[1] == "" and out[3] == ""
    assert out == [int8.translate([s], DecodeConfig(beam_size=2, max_len_b=5))[0] for s in SENTENCES]
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        Translator.load(model_dir, device="cuda", precision="int8")


@pytest.mark.parametrize("precision", [
    "fp32",
    pytest.param("int8", marks=pytest.mark.skipif(
        not hardware.detect().cpu_vnni,
        reason="int8 needs VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8); this CPU runs int8 requests in fp32")),
])
@pytest.mark.slow(seconds=270)
@pytest.mark.skipif(hardware.detect().cpp_compiler is None, reason="torch.compile needs a C++ compiler (g++, clang++)")
def test_compiled_decoder_translates_as_eager(model_dir, precision, monkeypatch):
    # Without max_autotune: it multiplies the compile time (minutes on an AVX2 CPU) and its GEMM
    # kernels are inductor's; test_float_models_autotune_on_the_cpu checks that it is asked for.
    monkeypatch.setattr(compile_module, "CPU_AUTOTUNE", False)
    eager = Translator.load(model_dir, precision=precision)
    compiled = Translator.load(model_dir, precision=precision, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    src = torch.tensor([[5, 9, 17, 4], [8, 6, 0, 0]])

    def second_step_logits(model, reorder, tokens):
        encoder_out = model.encode(src)
        cache = model.new_cache()
        model.decode(torch.tensor([[2], [2]]), encoder_out, cache=cache)
        if reorder is not None:
            cache.reorder(torch.tensor(reorder), include_cross=False)
        return model.decode(torch.tensor(tokens), encoder_out, cache=cache).logits

    # The second decoder step on the same cache state: the logits agree to float rounding. Once
    # with a memory row per row, once as beam search (2 beams) steps: beam rows share their
    # source's memory row, which the compiled step reads with `summed_attention`.
    with torch.inference_mode():
        for reorder, tokens in ((None, [[7], [9]]), ([0, 0, 1, 1], [[7], [9], [11], [7]])):
            eager_logits, compiled_logits = (
                second_step_logits(model, reorder, tokens) for model in (eager.model, compiled.model)
            )
            torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    out = compiled.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8))
    assert out == eager.translate(SENTENCES, DecodeConfig(beam_size=2, max_len_b=8))
    assert out == [compiled.translate([s], DecodeConfig(beam_size=2, max_len_b=8))[0] for s in SENTENCES]


def test_float_models_autotune_on_the_cpu(monkeypatch):
    asked = []

    def fake_compile(function, **kwargs):
        asked.append(kwargs)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    compile_module.compile_model(model, freeze=True)  # float: autotuned linear layers
    compile_module.compile_model(model, freeze=False)  # int8 layers: nothing to tune
    autotune = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    assert [kwargs["options"] for kwargs in asked] == [autotune, autotune, None, None]
    assert all(kwargs["dynamic"] is True for kwargs in asked)


def test_compile_without_a_compiler_warns_and_runs_eagerly(model_dir, translator, monkeypatch):
    import dataclasses

    caps = dataclasses.replace(hardware.detect(), cpp_compiler=None)
    monkeypatch.setattr(hardware, "detect", lambda: caps)
    with pytest.warns(RuntimeWarning, match="--compile needs a C\\+\\+ compiler"):
        eager = Translator.load(model_dir, precision="fp32", compile=True)
    assert eager.model.decode.__func__ is Transformer.decode  # not routed through torch.compile
    decode = DecodeConfig(beam_size=2, max_len_b=8)
    assert eager.translate(SENTENCES, decode) == translator.translate(SENTENCES, decode)


def test_translator_leaves_the_callers_model_alone_and_trainable(model_dir, translator):
    from aiayn.files.checkpoint import load_model

    model, tokenizer, _ = load_model(model_dir)
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    for precision in ("fp32", "bf16", "int8"):
        converted = Translator(model, tokenizer, precision=precision)
        assert converted.model is not model
    assert model.training and [type(module) for module in model.modules()] == kinds  # no layer replaced
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    # Still trainable: an update moves the linear layers too, not only embeddings and LayerNorms.
    src = torch.tensor([tokenizer.encode(SENTENCES[0])])
    tgt = torch.tensor([[2] + tokenizer.encode("A man rides a bike.")])
    model(src, tgt).logsumexp(-1).mean().backward()
    linear1 = model.decoder_layers[0].feed_forward.linear1
    assert isinstance(linear1, torch.nn.Linear) and linear1.weight.grad is not None
    fp32 = Translator(model, tokenizer, precision="fp32")
    decode = DecodeConfig(beam_size=2, max_len_b=8)
    assert fp32.translate(SENTENCES, decode) == translator.translate(SENTENCES, decode)


def test_compiling_an_int8_model_with_frozen_weights_raises():
    from aiayn.inference.quantize import quantize_int8

    model = quantize_int8(Transformer(ModelConfig.preset("tiny")).eval())
    with pytest.raises(ValueError, match="freeze=True with int8 layers gives unusable scores"):
        compile_module.compile_model(model, freeze=True)


def test_one_decode_config_from_the_cli_through_the_translator(translator):
    from aiayn.cli import _decode_config, build_parser

    args = build_parser().parse_args(["translate", "--model", "m"])
    assert _decode_config(args, nbest=args.nbest) == DecodeConfig()  # the CLI's defaults are DecodeConfig's
    # The Translator takes the DecodeConfig whole (its default is DecodeConfig()); validation is DecodeConfig's.
    assert translator.translate(SENTENCES[:2]) == translator.translate(SENTENCES[:2], DecodeConfig())
    decode = DecodeConfig(beam_size=2, max_len_b=8)
    short = decode.replace(max_len_a=0.0, max_len_b=1)
    assert translator.translate(SENTENCES[:1], decode) != translator.translate(SENTENCES[:1], short)
    with pytest.raises(ValueError, match=r"nbest must be an int in \[1, 2\], got 3"):
        translator.translate(SENTENCES, decode.replace(nbest=3))
