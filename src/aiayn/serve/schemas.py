"""The HTTP API's request and response bodies (pydantic; needs the `serve` extra)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiayn.config import (
    MAX_LENGTH_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    SERVER_MAX_BEAM_SIZE,
    SERVER_MAX_SAMPLING_TOPK,
    DecodeConfig,
    is_sampling,
)


def check_encodable(text: str, where: str) -> None:
    """Refuse a string that is not Unicode text: JSON's "\\udcff" escapes decode to lone surrogates,
    which pass as `str` but crash the tokenizer (and any UTF-8 encoder) later, inside a batch.

    Raises:
        ValueError: naming `where` and the first bad character's position (never the text itself).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        raise ValueError(
            f"{where} is not valid Unicode text: character {error.start} is a lone surrogate "
            f"(U+{code:04X}); send UTF-8 text"
        ) from None


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="one sentence (give this or `texts`)")
    texts: list[str] | None = Field(None, description="several sentences (give this or `text`)")
    beam_size: int = Field(DecodeConfig.beam_size, ge=1, le=SERVER_MAX_BEAM_SIZE, description="1 = greedy search")
    nbest: int = Field(DecodeConfig.nbest, ge=1, description="hypotheses per sentence, at most beam_size")
    # ge / le alone let NaN through (every comparison with NaN is false).
    length_penalty: float = Field(DecodeConfig.length_penalty, ge=0.0, le=MAX_LENGTH_PENALTY, allow_inf_nan=False,
                                  description="alpha of Wu et al. (2016)")
    sampling_topk: int = Field(DecodeConfig.sampling_topk, ge=0, le=SERVER_MAX_SAMPLING_TOPK,
                               description="sample from the k most probable pieces (0 = all; 1 = no sampling)")
    sampling_topp: float = Field(DecodeConfig.sampling_topp, gt=0.0, le=1.0, allow_inf_nan=False,
                                 description="nucleus sampling: the smallest set holding this probability")
    temperature: float = Field(DecodeConfig.temperature, gt=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="divides the log-probs before sampling")
    seed: int = Field(DecodeConfig.seed, ge=0, le=MAX_SEED, description="same seed and text, same samples")
    alignment: bool = Field(False, description="also return Pharaoh word alignments ('i-j ...') per hypothesis")
    split_sentences: bool = Field(False, description="translate each text sentence by sentence (the Moses splitter "
                                                     "in the model's source language) and join the translations")

    @model_validator(mode="after")
    def _check(self) -> "TranslateRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError(
                "give exactly one of 'text' (a string) or 'texts' (a list of strings)"
            )
        sampling = is_sampling(self.sampling_topk, self.sampling_topp)
        if sampling and self.nbest > SERVER_MAX_BEAM_SIZE:
            raise ValueError(f"nbest ({self.nbest}) must be <= {SERVER_MAX_BEAM_SIZE} samples")
        if not sampling and self.nbest > self.beam_size:
            raise ValueError(f"nbest ({self.nbest}) must be <= beam_size ({self.beam_size})")
        if self.text is not None:
            check_encodable(self.text, "text")
        for index, text in enumerate(self.texts or []):
            check_encodable(text, f"texts[{index}]")
        return self

class Hypothesis(BaseModel):
    text: str
    score: float
    alignment: str | None = None

class TranslateResponse(BaseModel):
    translations: list[str]
    nbest: list[list[Hypothesis]] | None = None
    alignments: list[str] | None = Field(None, description="with 'alignment': of each translation")

class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    target: str | None = Field(
        None, description="force this translation instead of decoding one"
    )

    @model_validator(mode="after")
    def _check(self) -> "AttentionRequest":
        check_encodable(self.text, "text")
        if self.target is not None:
            check_encodable(self.target, "target")
        return self

class ExplainRequest(AttentionRequest):
    kind: Literal["encoder", "decoder", "cross"] = Field(
        "encoder", description="which attention: encoder self, decoder masked self, or encoder-decoder")
    layer: int = Field(0, ge=0, description="0-based layer of that kind")


class AttentionResponse(BaseModel):
    translation: str
    source_tokens: list[str]
    target_input_tokens: list[str]
    target_tokens: list[str]
    cross: list = Field(description="[decoder layer][head][target token][source token]")
    encoder_self: list = Field(description="[encoder layer][head][source token][source token]")
    decoder_self: list = Field(
        description="[decoder layer][head][target position][target input token]"
    )


__all__ = ["AttentionRequest", "AttentionResponse", "ExplainRequest", "Hypothesis", "TranslateRequest",
           "TranslateResponse"]
