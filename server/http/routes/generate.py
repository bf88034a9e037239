"""Native generation: POST /v1/generate with an `adapter_id`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.http.deps import get_state, require_api_key
from server.http.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    TokenLogprobOut,
    TopLogprob,
    json_or_sse,
)
from server.http.sse import DONE, sse_event, sse_response
from server.http.state import ServerState, collect, sampling_params, usage

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 422, 429, 503)}


def logprobs_out(state: ServerState, logprobs) -> list[dict]:
    return [
        TokenLogprobOut(
            token_id=lp.token_id, token=state.token_text(lp.token_id), logprob=lp.logprob,
            top_logprobs=[TopLogprob(token_id=t, token=state.token_text(t), logprob=v) for t, v in lp.top],
        ).model_dump()
        for lp in logprobs
    ]


@router.post("/v1/generate", response_model=GenerateResponse, responses={**ERRORS, **json_or_sse(GenerateResponse)})
async def generate(body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)):
    """Generate text for one prompt with one adapter (or none). `stream: true` sends SSE token deltas,
    then a final event with `finish_reason` and `usage`, then `[DONE]`."""
    adapter = await state.resolve_adapter(body.adapter_id, "adapter_id")
    adapter_id = adapter.adapter_id if adapter else None
    prompt = state.tokenize(body.prompt)
    params = sampling_params(body, state.max_tokens_for(prompt, body.max_tokens), body.logprobs)
    stream = state.submit(prompt, params, adapter)
    request_id = f"gen-{stream.request_id}"
    if body.stream:

        async def events():
            async for out in stream:
                event = {"id": request_id, "adapter_id": adapter_id, "text": out.text, "token_ids": list(out.token_ids)}
                if body.logprobs is not None:
                    event["logprobs"] = logprobs_out(state, out.logprobs)
                if out.finished:
                    event["finish_reason"] = out.finish_reason
                    event["usage"] = usage(out.num_prompt_tokens, out.num_output_tokens)
                yield sse_event(event)
            yield DONE

        return sse_response(events())
    (result,) = await collect([stream], request)
    return GenerateResponse(
        id=request_id,
        adapter_id=adapter_id,
        text=result.text,
        finish_reason=result.finish_reason,
        usage=usage(result.num_prompt_tokens, result.num_output_tokens),
        logprobs=logprobs_out(state, result.logprobs) if body.logprobs is not None else None,
    )
