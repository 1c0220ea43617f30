"""Pydantic bodies of the HTTP API, and the kinds a request may name.

The application's arguments (`AppArgs`) are in `serve.options`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagebind_core.kinds import ALL_MODALITIES, KINDS

# What a request may name in its `modality` field, text (the OpenAI-compatible kind) first;
# `video` is encoded by the vision encoder (`imagebind_core.model_modality`).
ALL_KINDS: tuple[str, ...] = ("text", *(k for k in KINDS if k != "text"))
# The model's inputs, each served by one deployment named `encoder-{modality}`.
MODEL_MODALITIES: tuple[str, ...] = tuple(m.value for m in ALL_MODALITIES)


# ---------------------------------------------------------------------------------------------
# HTTP bodies
# ---------------------------------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: OpenAI's embeddings request plus `modality` and `normalize`.

    Strict types: `"normalize": "yes"` or `"dimensions": "32"` is a 400, not a guess.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    # What a field must be, said for a value of the wrong type (`serve.http.validation_message`).
    field_hints: ClassVar[dict[str, str]] = {
        "input": "must be a string or a list of strings (token-id arrays are not supported)",
    }

    input: str | list[str] = Field(
        description="One input or a list. Text: the string itself. Other modalities: base64, "
        "a `data:` URI, or an `s3://` URI under an operator-allowed prefix."
    )
    model: str | None = Field(default=None, description="Served model id; see GET /v1/models.")
    encoding_format: Literal["float", "base64"] = "float"
    modality: str = Field(default="text", description="One of " + ", ".join(ALL_KINDS))
    normalize: bool = Field(
        default=True,
        description="Unit-length vectors (default); false returns the reference model's raw "
        "output (after its post-processing, e.g. the logit scale).",
    )
    dimensions: int | None = Field(
        default=None, description="OpenAI field; accepted only if equal to the model's size."
    )
    user: str | None = Field(default=None, description="OpenAI field; ignored.")

    def inputs(self) -> list[str]:
        """The inputs as a list (a single string is a list of one)."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    """One vector of the response, at the position of its input."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """OpenAI usage block. `prompt_tokens` counts text tokens (start/end included); 0 for media."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """`POST /v1/embeddings` answer, OpenAI's shape."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`, OpenAI's shape plus what this endpoint serves."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagebind-ray"
    embed_dim: int | None = None
    modalities: list[str]
    lineage: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class SearchRequest(BaseModel):
    """`POST /v1/search`: embed one query (or take a raw vector, or an indexed item's own
    vector) and look it up in the index."""

    model_config = ConfigDict(extra="forbid", strict=True)
    field_hints: ClassVar[dict[str, str]] = {
        "input": "must be one string: the query (search takes one query per request)",
    }

    input: str | None = Field(default=None, description="The query, same forms as embeddings.")
    vector: list[float] | None = Field(default=None, description="A raw query vector instead.")
    id: str | None = Field(
        default=None,
        description="The id of an item of the published index: search with its stored vector "
        '("more like this").',
    )
    modality: str = Field(default="text", description="Modality of `input`.")
    model: str | None = None
    top_k: int = Field(default=10, ge=1, le=1000)
    filter_modality: str | None = Field(
        default=None, description="Return only hits of this modality (e.g. `vision`)."
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if sum(q is not None for q in (self.input, self.vector, self.id)) != 1:
            raise ValueError("give exactly one of `input`, `vector` or `id`")
        return self


class SearchHit(BaseModel):
    """One search result."""

    id: str
    uri: str | None = None
    modality: str | None = None
    score: float


class SearchResponse(BaseModel):
    """`POST /v1/search` answer, best hit first."""

    object: Literal["list"] = "list"
    data: list[SearchHit]
    model: str
