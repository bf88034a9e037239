"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

`model` names an adapter id, or the base model's name for no adapter. `n` > 1 and lists of prompts
run as separate engine requests in the same batch (seeded requests use seed + i for choice i).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request

from adapters.store import DamagedAdapterError
from server.chat_template import encode_chat
from server.http.deps import get_state, require_api_key
from server.http.errors import APIError
from server.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    json_or_sse,
)
from server.http.sse import DONE, sse_event, sse_response
from server.http.state import ServerState, collect, merge_streams, sampling_params, usage

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503)}


def refuse_unsupported(body) -> None:
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported; leave it at 0", field)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if getattr(body, "echo", False):
        raise APIError(400, "echo is not supported", "echo")
    if getattr(body, "suffix", None):
        raise APIError(400, "suffix is not supported", "suffix")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        raise APIError(400, "best_of is not supported (use n)", "best_of")
    if getattr(body, "tools", None):
        raise APIError(400, "tools are not supported", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported (output is not "
                       'constrained); only {"type": "text"} is', "response_format")


def submit_all(state: ServerState, prompts: list[list[int]], body, max_tokens, logprobs, adapter):
    """One engine request per (prompt, choice); if any is refused, none stays queued."""
    streams = []
    try:
        for prompt in prompts:
            prompt_max_tokens = state.max_tokens_for(prompt, max_tokens)
            for i in range(body.n):
                params = sampling_params(body, prompt_max_tokens, logprobs, seed_offset=i)
                streams.append(state.submit(prompt, params, adapter))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.tokenize(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [state.tokenize(p) for p in prompt]
    return [list(p) for p in prompt]


def completion_logprobs(state: ServerState, logprobs, offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in logprobs:
        text = state.token_text(lp.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top.append({state.token_text(t): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


@router.post("/v1/completions", responses={**ERRORS, **json_or_sse()})
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    """OpenAI text completion (streaming with `stream: true`)."""
    refuse_unsupported(body)
    adapter = await state.resolve_adapter(body.model, "model")
    prompts = completion_prompts(state, body.prompt)
    streams = submit_all(state, prompts, body, body.max_tokens, body.logprobs, adapter)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:

        async def events():
            offsets = [0] * len(streams)
            prompt_tokens = {}
            completion_tokens = [0] * len(streams)
            async for index, out in merge_streams(streams):
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(state, out.logprobs, offsets[index])
                offsets[index] += len(out.text)
                prompt_tokens[index // body.n] = out.num_prompt_tokens
                completion_tokens[index] = out.num_output_tokens
                choice = {"index": index, "text": out.text, "logprobs": logprobs,
                          "finish_reason": out.finish_reason if out.finished else None}
                yield sse_event({**base, "choices": [choice]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse_event({**base, "choices": [], "usage": usage(sum(prompt_tokens.values()), sum(completion_tokens))})
            yield DONE

        return sse_response(events())
    results = await collect(streams, request)
    choices = [
        {"index": i, "text": r.text, "finish_reason": r.finish_reason,
         "logprobs": completion_logprobs(state, r.logprobs, 0) if body.logprobs is not None else None}
        for i, r in enumerate(results)
    ]
    prompt_tokens = sum(results[p * body.n].num_prompt_tokens for p in range(len(prompts)))
    return {**base, "choices": choices, "usage": usage(prompt_tokens, sum(r.num_output_tokens for r in results))}


def message_text(message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content parts are supported, got {part.type!r}", "messages")
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(state: ServerState, messages) -> list[int]:
    return encode_chat(state.tokenizer, [{"role": m.role, "content": message_text(m)} for m in messages],
                       add_generation_prompt=True)


def chat_logprobs(state: ServerState, logprobs) -> dict:
    def entry(token_id, logprob):
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


@router.post("/v1/chat/completions", responses={**ERRORS, **json_or_sse()})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    """OpenAI chat completion (streaming with `stream: true`), using the tokenizer's chat template."""
    refuse_unsupported(body)
    adapter = await state.resolve_adapter(body.model, "model")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    streams = submit_all(state, [chat_prompt(state, body.messages)], body,
                         body.max_completion_tokens or body.max_tokens, logprobs, adapter)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model}

        async def events():
            for i in range(len(streams)):
                yield sse_event({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
            prompt_tokens, completion_tokens = 0, [0] * len(streams)
            async for index, out in merge_streams(streams):
                prompt_tokens = out.num_prompt_tokens
                completion_tokens[index] = out.num_output_tokens
                delta = {"content": out.text} if out.text or not out.finished else {}
                choice = {"index": index, "delta": delta,
                          "logprobs": chat_logprobs(state, out.logprobs) if logprobs is not None else None,
                          "finish_reason": out.finish_reason if out.finished else None}
                yield sse_event({**base, "choices": [choice]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse_event({**base, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))})
            yield DONE

        return sse_response(events())
    results = await collect(streams, request)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
         "logprobs": chat_logprobs(state, r.logprobs) if logprobs is not None else None}
        for i, r in enumerate(results)
    ]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices,
            "usage": usage(results[0].num_prompt_tokens, sum(r.num_output_tokens for r in results))}


def model_card(state: ServerState, model_id: str) -> ModelCard:
    """The base model's card, or an adapter's (KeyError if there is no such adapter)."""
    if model_id == state.model_name:
        return ModelCard(id=state.model_name, created=state.started_at, root=state.model_name)
    info = state.store.info(model_id)
    return ModelCard(id=model_id, created=info.created, parent=state.model_name, root=state.model_name,
                     method=info.method, r=info.r)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: ServerState = Depends(get_state)):
    """The base model and every stored adapter (`parent` is the base model)."""
    cards = [model_card(state, state.model_name)]
    for adapter_id in state.store.ids():
        try:
            cards.append(model_card(state, adapter_id))
        except (KeyError, DamagedAdapterError):  # deleted meanwhile, or damaged (logged and counted)
            continue
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, state: ServerState = Depends(get_state)):
    """One model: the base model or an adapter (a hub-style base name may hold a `/`)."""
    try:
        return model_card(state, model_id)
    except KeyError:
        raise APIError(404, f"model {model_id!r} not found", "model_id") from None
