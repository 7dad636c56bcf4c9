"""Incremental detokenization for streaming, and stop-string matching on the streamed text.

Decoding the whole output every step is O(n) per token; instead, as in vLLM's detokenize_incrementally, we
decode only a small window: `prefix` tokens already emitted (context, so that tokenizers whose decoding
depends on neighbours, e.g. SentencePiece leading spaces, stay right) plus the `read` tokens not yet emitted.
Text is held back while it ends with U+FFFD, i.e. while the last tokens carry an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
# Prompt tokens used as decoding context for the first generated tokens (vLLM uses the same number).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into stable text deltas.

    The concatenation of all deltas and flush() equals tokenizer.decode(generated_ids) for byte-level BPE
    tokenizers; each push costs O(tokens in the window), not O(output length).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [] if prompt_ids is None else [int(t) for t in prompt_ids[-_PROMPT_CONTEXT:]]
        # A prompt ending mid-character would glue its bytes to the first generated ones: use no context then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(context)  # first token whose text is not emitted yet
        self._chunks: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """All generated token ids pushed so far."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append newly generated tokens and return the newly stable text (maybe empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit the held-back tail at the end of generation, even if it is an incomplete character."""
        return self._advance(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet (e.g. skipped special tokens) or a partial UTF-8 character
        delta = new_text[len(prefix_text) :]
        # The emitted tokens become the next window's context; older tokens are never decoded again.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta


class StopStringMatcher:
    """Cuts a text stream at the first completed stop string, which is not emitted (as in the OpenAI API).

    Only the longest tail that could still start a stop string is held back (fewer than max(len(stop))
    characters), so ordinary text streams through without delay. Empty stop strings are ignored.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = sorted({s for s in stop if s}, key=len, reverse=True)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string completed)."""
        if self.stopped:
            return "", True
        buf = self._held + delta
        cut = self._first_stop(buf)
        if cut is not None:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Emit the held-back text when generation ends for another reason."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, buf: str) -> int | None:
        """Start of the stop string that completes first in buf (the longest one on a tie), else None."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
