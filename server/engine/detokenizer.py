"""Incremental detokenization with stop strings.

Decoding a window of recent ids (a few prompt ids as left context, as tokenizers that drop a
leading space need) turns each new token into new text without re-decoding the whole output.
Text is held back while it ends in an incomplete UTF-8 character or could still grow into a stop
string, so a streamed delta is never taken back.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 6
_TRIM_TOKENS = 64
"""Ids before the decode window are dropped once this many have piled up (kept memory and work per token O(1))."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()):
        # the Rust tokenizer's own decode, when there is one: HF's Python wrapper costs 5x more per call
        self._raw_decode = getattr(getattr(tokenizer, "backend_tokenizer", None), "decode", None)
        self.tokenizer = tokenizer
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending = ""
        """Text not returned by take_delta yet. Emitted text is never needed again: a stop string can only start
        in the pending text, since any earlier start would have been held back (take_delta)."""

    def _decode(self, ids: list[int]) -> str:
        if self._raw_decode is not None:
            return self._raw_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> bool:
        """Append one generated token; True if the text now contains a stop string (text is cut before it)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # nothing printable yet (or an incomplete UTF-8 sequence)
        old_len = len(self._pending)
        self._pending += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset >= _TRIM_TOKENS:
            del self._ids[: self._prefix_offset]
            self._prefix_offset, self._read_offset = 0, self._read_offset - self._prefix_offset
        if not self.stop:
            return False
        start = max(0, old_len - self._max_stop + 1)
        hits = [i for i in (self._pending.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self._pending = self._pending[: min(hits)]
            return True
        return False

    def take_delta(self, final: bool = False) -> str:
        """Text not yet returned, minus a tail that may still become a stop string (unless final)."""
        end = len(self._pending) if final else len(self._pending) - self._held_back()
        delta, self._pending = self._pending[:end], self._pending[end:]
        return delta

    def _held_back(self) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
