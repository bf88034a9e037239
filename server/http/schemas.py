"""Public request/response schemas (pydantic), at the HTTP edge only; the engine uses dataclasses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.engine.sampling import MAX_LOGPROBS, MAX_SEED, MIN_SEED


class SamplingFields(BaseModel):
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; absent = until EOS or the context is full.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off.")
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED, description="Same seed, prompt and adapter -> same output.")
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings; the text ends before the first.")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


class GenerateRequest(SamplingFields):
    """Native generation request."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1)
    adapter_id: str | None = Field(None, description="Adapter to apply; null = the base model.")
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return logprobs with the top N alternatives.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class GenerateResponse(BaseModel):
    id: str
    adapter_id: str | None
    text: str
    finish_reason: str | None
    usage: Usage
    logprobs: list[TokenLogprobOut] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(..., description='Only "text" is served; "json_object" and "json_schema" answer 400.')


class OpenAIFields(SamplingFields):
    """Fields common to the OpenAI completion endpoints; unknown fields are ignored as OpenAI clients expect."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., description="An adapter id, or the base model's name for no adapter.")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None


class AdapterOut(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    method: str
    r: int
    groups: list[str]
    num_params: int
    size_bytes: int
    checksum: str
    created: int
    base_model: str | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pica-serve"
    parent: str | None = None
    root: str | None = None
    method: str | None = None
    r: int | None = None
    """An adapter's rank (its largest, for methods with a rank per layer)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def json_or_sse(model: type[BaseModel] | None = None) -> dict:
    """OpenAPI for a 200 that is JSON, or SSE (`data: <json>` events, then `data: [DONE]`) with `stream: true`."""
    json_schema = {"$ref": f"#/components/schemas/{model.__name__}"} if model else {"type": "object"}
    return {200: {"description": "JSON; with `stream: true`, server-sent events ending in `data: [DONE]`",
                  "content": {"application/json": {"schema": json_schema},
                              "text/event-stream": {"schema": {"type": "string"}}}}}


UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["adapter_id", "files"],
        "properties": {
            "adapter_id": {"type": "string", "description": "1-128 characters of A-Za-z0-9._-"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "adapter_config.json and adapter_model.safetensors, or one "
                                     ".tar.gz/.tgz/.tar/.zip archive of the adapter folder"},
        },
    }}},
}
