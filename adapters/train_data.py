"""Training data: JSONL rows -> token ids with a loss mask on the completion / assistant tokens only.

Rows are `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}` (rendered
with the same chat formatting the server uses). Every bad row is reported with its line number;
none is skipped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from server.chat_template import encode_chat

log = logging.getLogger(__name__)
IGNORE = -100
MAX_REPORTED = 20


class DataError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED] + ([f"... and {len(problems) - MAX_REPORTED} more"] if len(problems) > MAX_REPORTED else [])
        super().__init__("bad training data:\n  " + "\n  ".join(shown))


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """Same length; IGNORE where no loss is taken."""


def _prompt_completion(tokenizer, row: dict) -> Example:
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion)


def _messages(tokenizer, messages: list[dict]) -> Example:
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(encode_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return "every message needs string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message: nothing to learn from"
        return None
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
        return "needs string 'prompt' and 'completion' (or 'messages')"
    if not row["completion"]:
        return "'completion' is empty"
    return None


def load_examples(path: Path, tokenizer, max_length: int) -> list[Example]:
    """Parse and tokenize a JSONL file; DataError lists every bad row. Longer rows are truncated (logged)."""
    problems, examples, truncated = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {line_no}: not valid JSON ({exc.msg})")
                continue
            problem = _row_problem(row)
            if problem:
                problems.append(f"line {line_no}: {problem}")
                continue
            example = _messages(tokenizer, row["messages"]) if "messages" in row else _prompt_completion(tokenizer, row)
            if len(example.input_ids) > max_length:
                truncated += 1
                example = Example(example.input_ids[:max_length], example.labels[:max_length])
            if all(label == IGNORE for label in example.labels):
                problems.append(f"line {line_no}: no completion tokens left within max_length={max_length}")
                continue
            examples.append(example)
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([f"{path}: no training rows"])
    if truncated:
        log.warning("%d of %d rows were longer than max_length=%d and were truncated", truncated, len(examples), max_length)
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels [B, L]."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
