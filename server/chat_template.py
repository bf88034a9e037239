"""Chat messages -> prompt text, the same way for serving and training."""

from __future__ import annotations

FALLBACK_FORMAT = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template; without one, `role: content` lines (then `assistant:`)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    text = "".join(FALLBACK_FORMAT.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (FALLBACK_GENERATION_PROMPT if add_generation_prompt else "")


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of the rendered chat (a template brings its own special tokens)."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
