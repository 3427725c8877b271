"""Exporting a model directory to Hugging Face Marian and to CTranslate2.

    export(dir, "marian", out)        a `MarianMTModel` directory (config, weights, SentencePiece model,
                                      vocab.json, generation defaults) that `from_pretrained` loads
    export(dir, "ctranslate2", out)   a CTranslate2 model (model.bin, vocabulary, the SentencePiece
                                      model), made by CTranslate2's own converter, optionally quantized

Both compute aiayn's function: greedy search gives aiayn's tokens, and beam search too where the
libraries' search matches aiayn's (the length penalty form differs; see below). Shape legend:
E d_model, V vocabulary.

The conventions that differ, and how each export maps them (aiayn / HF Marian / CTranslate2):

    sinusoid layout    interleaved sin, cos / [sin | cos] rebuilt at every load: the export permutes
                       the d_model basis / aiayn's own table, stored in model.bin
    decoder start      <s> (id 2) / decoder_start_token_id = 2 / decoder_start_token "<s>"
    source end marker  none / the tokenizer appends </s>: add_special_tokens=False / pieces as given
                       (add_source_eos stays false)
    length penalty     GNMT ((5 + L) / 6)^alpha, L counting EOS / L^beta, L counting EOS
                       (`marian_length_penalty`) / L^beta, L without EOS (`ctranslate2_length_penalty`)
    beam stopping      once beam_size hypotheses have ended / the same (early_stopping=True) / the
                       same, except with length_penalty 0 (`CTRANSLATE2_NO_PENALTY`)
    maximum length     floor(a * S + b) per sentence, then EOS forced / max_length per call, EOS forced
                       (forced_eos_token_id) / max_decoding_length per call, then the output is cut
    <pad>, <s>         never generated, masked after the log-softmax / bad_words_ids, after it too /
                       suppress_sequences, before it (the other tokens' probabilities renormalised)

Why the basis permutation is exact: a Transformer's residual stream can be re-indexed by any
permutation P of its E features if every weight that reads the stream (embedding columns, every
Linear's input columns) and every weight that writes it (Linear output rows and biases, LayerNorm's
gain and bias) is re-indexed with it: LayerNorm is permutation-equivariant and every other step is
a sum over the stream, so each logit is the same sum in another order. Choosing P so that aiayn's
interleaved table becomes HF's [sin | cos] table lets HF rebuild its own table at load (it never
stores one: `MarianMTModel._keys_to_ignore_on_save`) and still compute aiayn's function.

CTranslate2 is not converted from the Marian export: CTranslate2's Marian loader hard-codes two
conventions of Marian's own models that aiayn's do not share: the decoder starts from a zero
embedding (aiayn starts from <s>'s embedding), and the last vocabulary row is dropped as the <pad>
that Transformers appends to Marian vocabularies (aiayn's <pad> is id 0 and its last row is a real
piece). The export builds CTranslate2's Transformer specification from aiayn's weights instead, the
way CTranslate2's fairseq and OpenNMT-py converters do, and saves it with CTranslate2's converter
(validation, quantization, files). That path also takes aiayn's fused q|k|v and k|v projections
and its table as they are, learned positions and pre-norm stacks included.

Refused (ValueError): positions inside attention (rope, alibi, relative) and none, for both; for
Marian also learned positions and pre-norm stacks. HF's `MarianMTModel` is post-norm only, and its
position table is rebuilt as sinusoids at every load and dropped by `save_pretrained`, so a learned
table would be lost the first time the model is re-saved.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from aiayn.config import CTRANSLATE2_QUANTIZATIONS, DecodeConfig, ModelConfig
from aiayn.config import EXPORT_TARGETS as TARGETS
from aiayn.model.transformer import Transformer, sinusoidal_table
from aiayn.files.tokenizer import Tokenizer

# The output length (pieces, EOS included) at which the exports' default length penalty changes
# like GNMT's (see `marian_length_penalty`): a typical sentence. On test2016 the demo model's
# translations average 14 pieces; sweeping CTranslate2's beta there, agreement with aiayn's beam 4
# peaks at 0.43-0.46, which 16 gives.
REFERENCE_LENGTH = 16


def check_exportable(config: ModelConfig, target: str) -> None:
    """Raise ValueError (naming the setting and why) unless `target` can represent the model exactly."""
    if target not in TARGETS:
        raise ValueError(f"export target must be one of {TARGETS}, got {target!r}")
    kind = config.positional_encoding
    if kind not in ("sinusoidal", "learned"):
        raise ValueError(
            f"positional_encoding={kind!r} cannot be exported to {target}: its positions act inside "
            "self-attention (or are absent), which neither Marian nor the CTranslate2 Transformer "
            "specification computes the way aiayn does; sinusoidal (and, for ctranslate2, learned) can be exported"
        )
    if target == "marian" and kind == "learned":
        raise ValueError(
            "positional_encoding='learned' cannot be exported to marian: MarianMTModel rebuilds its "
            "position table as sinusoids at every load and save_pretrained drops it, so a learned table "
            "would be lost; export to ctranslate2 instead"
        )
    if target == "marian" and config.norm_first:
        raise ValueError("norm_first=true (pre-LN) cannot be exported to marian: MarianMTModel is post-LN "
                         "only; export to ctranslate2 instead")


def marian_length_penalty(alpha: float, length: float = REFERENCE_LENGTH) -> float:
    """HF's length_penalty beta (score / L^beta, L counting EOS) closest to aiayn's GNMT alpha.

    No beta equals ((5 + L) / 6)^alpha at every length; this one makes both change by the same
    factor per extra token at `length` (equal d log(penalty) / dL: beta / L = alpha / (5 + L)).
    alpha = 0 (no penalty) maps exactly to 0.
    """
    return alpha * length / (5.0 + length)


# CTranslate2 reads length_penalty == 0 as "stop once the best candidate ends" (without a penalty
# nothing later can beat it); with any other value it stops, like aiayn (fairseq's rule), once
# beam_size hypotheses have ended, which can be a worse one. The smallest penalty keeps aiayn's
# rule: L^1e-6 is within 1e-5 of 1 for every L under 10^4 pieces.
CTRANSLATE2_NO_PENALTY = 1e-6


def ctranslate2_length_penalty(alpha: float, length: float = REFERENCE_LENGTH) -> float:
    """CTranslate2's length_penalty beta closest to GNMT alpha; its L leaves EOS out (L - 1 here).

    alpha = 0 maps to `CTRANSLATE2_NO_PENALTY`, not 0, which would change the stopping rule.
    """
    if alpha == 0:
        return CTRANSLATE2_NO_PENALTY
    return alpha * (length - 1.0) / (5.0 + length)


# --- Hugging Face Marian ---------------------------------------------------------------------


def residual_permutation(d_model: int) -> Tensor:
    """P with sinusoidal_table(...)[:, P] = HF Marian's [sin | cos] table: even features, then odd. [E]."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def marian_weights(model: Transformer) -> dict[str, Tensor]:
    """aiayn's weights under MarianMTModel's names, the residual stream permuted (`residual_permutation`).

    Tied weights appear under each of their HF names (the same tensor). Raises ValueError for a
    model `check_exportable` refuses.
    """
    config = model.config
    check_exportable(config, "marian")
    d = config.d_model
    perm = residual_permutation(d)
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}

    def reads(weight: Tensor) -> Tensor:  # [out, E]: input columns follow the stream
        return weight[:, perm].contiguous()

    def writes(tensor: Tensor) -> Tensor:  # [E, in] rows or [E] bias / LayerNorm: outputs follow it
        return tensor[perm].contiguous()

    out: dict[str, Tensor] = {}

    def attention(prefix: str, source: str) -> None:
        weight, bias = state[f"{source}.in_proj.weight"], state[f"{source}.in_proj.bias"]  # [3E, E], [3E]
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):  # rows q | k | v (InProjection)
            out[f"{prefix}.{name}.weight"] = reads(weight[i * d:(i + 1) * d])
            out[f"{prefix}.{name}.bias"] = bias[i * d:(i + 1) * d].clone()
        out[f"{prefix}.out_proj.weight"] = writes(state[f"{source}.out_proj.weight"])
        out[f"{prefix}.out_proj.bias"] = writes(state[f"{source}.out_proj.bias"])

    def norm(prefix: str, source: str) -> None:
        out[f"{prefix}.weight"] = writes(state[f"{source}.weight"])
        out[f"{prefix}.bias"] = writes(state[f"{source}.bias"])

    def feed_forward(prefix: str, source: str) -> None:
        out[f"{prefix}.fc1.weight"] = reads(state[f"{source}.linear1.weight"])
        out[f"{prefix}.fc1.bias"] = state[f"{source}.linear1.bias"].clone()
        out[f"{prefix}.fc2.weight"] = writes(state[f"{source}.linear2.weight"])
        out[f"{prefix}.fc2.bias"] = writes(state[f"{source}.linear2.bias"])

    for i in range(config.n_encoder_layers):
        hf, ours = f"model.encoder.layers.{i}", f"encoder_layers.{i}"
        attention(f"{hf}.self_attn", f"{ours}.self_attn")
        norm(f"{hf}.self_attn_layer_norm", f"{ours}.norm1")
        feed_forward(hf, f"{ours}.feed_forward")
        norm(f"{hf}.final_layer_norm", f"{ours}.norm2")
    for i in range(config.n_decoder_layers):
        hf, ours = f"model.decoder.layers.{i}", f"decoder_layers.{i}"
        attention(f"{hf}.self_attn", f"{ours}.self_attn")
        norm(f"{hf}.self_attn_layer_norm", f"{ours}.norm1")
        attention(f"{hf}.encoder_attn", f"{ours}.cross_attn")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ours}.norm2")
        feed_forward(hf, f"{ours}.feed_forward")
        norm(f"{hf}.final_layer_norm", f"{ours}.norm3")

    source_embedding = reads(state["src_embedding.weight"])  # [V, E]
    if config.share_embeddings:
        for name in ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
            out[f"{name}.weight"] = source_embedding
    else:
        out["model.encoder.embed_tokens.weight"] = source_embedding
        out["model.decoder.embed_tokens.weight"] = reads(state["tgt_embedding.weight"])
        out["lm_head.weight"] = reads(state["output_projection.weight"])
    return out


def marian_config(config: ModelConfig) -> dict[str, Any]:
    """MarianConfig fields for `config`: post-LN, ReLU, embeddings scaled by sqrt(E), aiayn's ids."""
    return dict(
        vocab_size=config.vocab_size, decoder_vocab_size=config.vocab_size, d_model=config.d_model,
        encoder_layers=config.n_encoder_layers, decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads, decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff, activation_function="relu",
        max_position_embeddings=config.max_positions, scale_embedding=True,
        share_encoder_decoder_embeddings=config.share_embeddings, tie_word_embeddings=config.share_embeddings,
        dropout=config.dropout, attention_dropout=config.attention_dropout, activation_dropout=0.0,
        pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
        decoder_start_token_id=config.bos_id, forced_eos_token_id=config.eos_id,
    )


def marian_generation_config(config: ModelConfig, decode: DecodeConfig) -> dict[str, Any]:
    """`generate` defaults: aiayn's start token, <pad> and <s> never generated (after log-softmax, as
    aiayn), EOS forced at the maximum length, aiayn's beam with the nearest length penalty
    (`marian_length_penalty`), early stopping at `beam_size` finished hypotheses (aiayn's stopping
    rule), and aiayn's cap: max_positions - 1 pieces and EOS after the start token. A call's
    max_length = floor(a * S + b) + 2 (start token, pieces, EOS) gives aiayn's maximum length for
    sources of S pieces."""
    return dict(
        decoder_start_token_id=config.bos_id, bos_token_id=config.bos_id, eos_token_id=config.eos_id,
        pad_token_id=config.pad_id, forced_eos_token_id=config.eos_id,
        bad_words_ids=[[config.pad_id], [config.bos_id]], num_beams=decode.beam_size,
        length_penalty=marian_length_penalty(decode.length_penalty), early_stopping=True,
        max_length=config.max_positions + 1,
    )


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"exporting needs {module} ({error}): pip install 'aiayn[bench]'") from None


def _write_marian(model: Transformer, tokenizer: Tokenizer, info: dict[str, Any], decode: DecodeConfig,
                  directory: Path) -> None:
    transformers = _require("transformers")
    config = model.config
    hf_config = transformers.MarianConfig(**marian_config(config))
    hf_model = transformers.MarianMTModel(hf_config).eval()
    missing, unexpected = hf_model.load_state_dict(marian_weights(model), strict=False)
    built = {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight", "final_logits_bias"}
    if unexpected or set(missing) - built:
        raise RuntimeError(f"this transformers version's MarianMTModel has other parameters than the export "
                           f"maps (missing {sorted(set(missing) - built)[:3]}, unexpected {unexpected[:3]})")
    expected = sinusoidal_table(config.max_positions, config.d_model)[:, residual_permutation(config.d_model)]
    for table in (hf_model.model.encoder.embed_positions.weight, hf_model.model.decoder.embed_positions.weight):
        if not torch.allclose(table.detach(), expected, atol=1e-5):
            raise RuntimeError("this transformers version builds another Marian position table than "
                               "[sin | cos]: the export would not compute the model's function")
    if bool(hf_model.final_logits_bias.any()):
        raise RuntimeError("MarianMTModel's final_logits_bias is not zero after building")
    hf_model.generation_config = transformers.GenerationConfig(**marian_generation_config(config, decode))
    hf_model.save_pretrained(directory)

    # MarianTokenizer: source.spm / target.spm (the same joint model) and vocab.json with aiayn's ids.
    with tempfile.TemporaryDirectory() as scratch:
        spm_path = Path(scratch) / "source.spm"
        spm_path.write_bytes(tokenizer.to_bytes())
        vocab_path = Path(scratch) / "vocab.json"
        pieces = tokenizer.pieces(range(tokenizer.vocab_size))
        vocab_path.write_text(json.dumps({piece: i for i, piece in enumerate(pieces)}, ensure_ascii=False),
                              encoding="utf-8")
        hf_tokenizer = transformers.MarianTokenizer(
            source_spm=str(spm_path), target_spm=str(spm_path), vocab=str(vocab_path),
            source_lang=info.get("src_lang"), target_lang=info.get("tgt_lang"),
            unk_token=pieces[config.unk_id], eos_token=pieces[config.eos_id], pad_token=pieces[config.pad_id],
            bos_token=pieces[config.bos_id],  # special, so decode(skip_special_tokens=True) drops the start token
            model_max_length=config.max_positions,
        )
        hf_tokenizer.save_pretrained(directory)


# --- CTranslate2 -----------------------------------------------------------------------------


def ctranslate2_spec(model: Transformer, tokenizer: Tokenizer) -> Any:
    """CTranslate2's `TransformerSpec` holding aiayn's weights as they are (see the module docstring).

    Raises ValueError for a model `check_exportable` refuses.
    """
    config = model.config
    check_exportable(config, "ctranslate2")
    specs = _require("ctranslate2.specs")
    d = config.d_model
    state = {name: tensor.detach().float().cpu().contiguous().numpy() for name, tensor in model.state_dict().items()}
    spec = specs.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers), config.n_heads, pre_norm=config.norm_first,
        activation=specs.common_spec.Activation.RELU,
    )
    if config.positional_encoding == "sinusoidal":
        table = sinusoidal_table(config.max_positions, d).numpy()  # [max_positions, E], interleaved
    else:
        table = state["positions.weight"]

    def linear(target: Any, source: str, rows: slice = slice(None)) -> None:
        target.weight = state[f"{source}.weight"][rows]
        target.bias = state[f"{source}.bias"][rows]

    def norm(target: Any, source: str) -> None:
        target.gamma, target.beta = state[f"{source}.weight"], state[f"{source}.bias"]

    def feed_forward(target: Any, source: str) -> None:
        linear(target.linear_0, f"{source}.linear1")
        linear(target.linear_1, f"{source}.linear2")

    # Post-norm and pre-norm layers hold the same LayerNorms; CTranslate2's pre_norm says where they act.
    encoder, decoder = spec.encoder, spec.decoder
    for stack in (encoder, decoder):
        stack.scale_embeddings = True  # sqrt(E), section 3.4
        stack.position_encodings.encodings = table
    shared = config.share_embeddings
    encoder.embeddings[0].weight = state["src_embedding.weight"]
    decoder.embeddings.weight = state["src_embedding.weight" if shared else "tgt_embedding.weight"]
    decoder.projection.weight = state["src_embedding.weight" if shared else "output_projection.weight"]
    for i, layer in enumerate(encoder.layer):
        ours = f"encoder_layers.{i}"
        linear(layer.self_attention.linear[0], f"{ours}.self_attn.in_proj")  # fused q | k | v, [3E, E]
        linear(layer.self_attention.linear[1], f"{ours}.self_attn.out_proj")
        norm(layer.self_attention.layer_norm, f"{ours}.norm1")
        feed_forward(layer.ffn, f"{ours}.feed_forward")
        norm(layer.ffn.layer_norm, f"{ours}.norm2")
    for i, layer in enumerate(decoder.layer):
        ours = f"decoder_layers.{i}"
        linear(layer.self_attention.linear[0], f"{ours}.self_attn.in_proj")
        linear(layer.self_attention.linear[1], f"{ours}.self_attn.out_proj")
        norm(layer.self_attention.layer_norm, f"{ours}.norm1")
        linear(layer.attention.linear[0], f"{ours}.cross_attn.in_proj", slice(0, d))  # q, [E, E]
        linear(layer.attention.linear[1], f"{ours}.cross_attn.in_proj", slice(d, None))  # fused k | v, [2E, E]
        linear(layer.attention.linear[2], f"{ours}.cross_attn.out_proj")
        norm(layer.attention.layer_norm, f"{ours}.norm2")
        feed_forward(layer.ffn, f"{ours}.feed_forward")
        norm(layer.ffn.layer_norm, f"{ours}.norm3")
    if config.norm_first:
        norm(encoder.layer_norm, "encoder_norm")
        norm(decoder.layer_norm, "decoder_norm")

    pieces = tokenizer.pieces(range(tokenizer.vocab_size))
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.unk_token, spec.config.bos_token = pieces[config.unk_id], pieces[config.bos_id]
    spec.config.eos_token, spec.config.decoder_start_token = pieces[config.eos_id], pieces[config.bos_id]
    spec.config.add_source_bos = spec.config.add_source_eos = False  # aiayn's sources carry no special token
    spec.config.layer_norm_epsilon = 1e-5  # torch.nn.LayerNorm's
    return spec


def _write_ctranslate2(model: Transformer, tokenizer: Tokenizer, quantization: str | None, directory: Path) -> None:
    converters = _require("ctranslate2.converters")
    spec = ctranslate2_spec(model, tokenizer)

    class SpecConverter(converters.Converter):
        """CTranslate2's converter (validate, quantize, save) for a specification built here."""

        def _load(self) -> Any:
            return spec

    SpecConverter().convert(str(directory), quantization=quantization, force=True)
    (directory / Tokenizer.MODEL_FILE).write_bytes(tokenizer.to_bytes())


# --- both ------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty; replace it with --overwrite, or choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")


def _publish_directory(out: Path, write: Callable[[Path], None], needed: int) -> Path:
    """Write into a temporary directory beside `out` (about `needed` bytes), then swap it in: a
    failed export leaves `out` as it was."""
    from aiayn.files.atomic import publish, reporting_full_disk
    from aiayn.files.checkpoint import _remove_tree

    old = None
    with reporting_full_disk(out, needed):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp_{out.name}."))
        try:
            write(tmp)
            if out.exists():
                old = out.parent / f".old_{out.name}.{tmp.name.rsplit('.', 1)[-1]}"
                out.rename(old)
            publish(tmp, out, mode=0o777)
        except BaseException:
            _remove_tree(tmp)
            if old is not None and not out.exists():
                old.rename(out)
            raise
    if old is not None:
        _remove_tree(old)
    return out


def export(model_dir: str | Path, target: str, out: str | Path, *, quantization: str | None = None,
           decode: DecodeConfig | None = None, overwrite: bool = False) -> Path:
    """Export the model directory `model_dir` to `target` ("marian" or "ctranslate2") in `out`.

    Args:
        quantization: CTranslate2 only: a weight type of `CTRANSLATE2_QUANTIZATIONS` (None: float32).
        decode: Marian only: the search the generation defaults describe (default `DecodeConfig()`).
        overwrite: replace a non-empty `out` (without it, a non-empty `out` is refused).
    Returns:
        `out`.
    Raises:
        ValueError: an unknown target or quantization, or a model the target cannot represent.
        FileExistsError: `out` is not empty and overwrite is false.
        ImportError: transformers / ctranslate2 missing (the `export` extra).
        FileNotFoundError / ValueError: a missing or damaged model directory.
    """
    from aiayn.files.checkpoint import load_model, read_model_config

    out = Path(out)
    if target not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {target!r}")
    if quantization is not None and target != "ctranslate2":
        raise ValueError("--quantization applies to --to ctranslate2 only")
    if quantization is not None and quantization not in CTRANSLATE2_QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {CTRANSLATE2_QUANTIZATIONS}, got {quantization!r}")
    config, _ = read_model_config(model_dir)
    check_exportable(config, target)  # before the weights are read
    _check_out(out, overwrite)
    _require("transformers" if target == "marian" else "ctranslate2")
    model, tokenizer, info = load_model(model_dir)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())  # float32 weights
    if target == "marian":
        return _publish_directory(out, lambda tmp: _write_marian(model, tokenizer, info, decode or DecodeConfig(), tmp),
                                  needed)
    return _publish_directory(out, lambda tmp: _write_ctranslate2(model, tokenizer, quantization, tmp), needed)


__all__ = [
    "CTRANSLATE2_NO_PENALTY", "CTRANSLATE2_QUANTIZATIONS", "REFERENCE_LENGTH", "TARGETS", "check_exportable",
    "ctranslate2_length_penalty", "ctranslate2_spec", "export", "marian_config", "marian_generation_config",
    "marian_length_penalty", "marian_weights", "residual_permutation",
]
