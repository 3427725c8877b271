"""The HTTP API's request and response bodies (pydantic; needs the `serve` extra)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiayn.config import DecodeConfig
from aiayn.server import MAX_BEAM_SIZE


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="one sentence (give this or `texts`)")
    texts: list[str] | None = Field(None, description="several sentences (give this or `text`)")
    beam_size: int = Field(DecodeConfig.beam_size, ge=1, le=MAX_BEAM_SIZE, description="1 = greedy search")
    nbest: int = Field(DecodeConfig.nbest, ge=1, description="hypotheses per sentence, at most beam_size")
    length_penalty: float = Field(DecodeConfig.length_penalty, ge=0.0, le=10.0,
                                  description="alpha of Wu et al. (2016)")

    @model_validator(mode="after")
    def _check(self) -> "TranslateRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError(
                "give exactly one of 'text' (a string) or 'texts' (a list of strings)"
            )
        if self.nbest > self.beam_size:
            raise ValueError(f"nbest ({self.nbest}) must be <= beam_size ({self.beam_size})")
        return self

class Hypothesis(BaseModel):
    text: str
    score: float

class TranslateResponse(BaseModel):
    translations: list[str]
    nbest: list[list[Hypothesis]] | None = None

class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    target: str | None = Field(
        None, description="force this translation instead of decoding one"
    )

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


__all__ = ["AttentionRequest", "AttentionResponse", "Hypothesis", "TranslateRequest", "TranslateResponse"]
