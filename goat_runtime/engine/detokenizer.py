"""Incremental detokenization of one completion, with stop strings.

Decoding token by token is wrong for most tokenizers: SentencePiece drops the leading space of a
sequence's first token, and byte-level BPE splits multi-byte characters across tokens (a token
alone decodes to U+FFFD). So, as vLLM and TGI do, each step decodes a short window of tokens
twice, with and without the new ones (prefix offset .. read offset .. end), and emits the
difference, holding it back while it ends in U+FFFD (an incomplete character). Only the window
is decoded, never the whole output, so a token costs the same at any length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first output token, so that it decodes in context (its
# leading space, a character it completes); vLLM uses as many.
_PROMPT_CONTEXT = 5
# A window ending in U+FFFD for this many tokens holds a genuine replacement character (a
# UTF-8 character spans at most 4 bytes), not a character still being completed: emit it.
_MAX_HELD_TOKENS = 16


def window_decoder(tokenizer: PreTrainedTokenizerBase,
                   skip_special_tokens: bool) -> Callable[[list[int]], str | list[str]]:
    """Decodes a window of token ids exactly as `tokenizer.decode` does, without clean-up of
    tokenization spaces (it rewrites text across token boundaries, " ." -> ".", so windows would
    not add up to the whole). A fast tokenizer whose class decodes as transformers' does is
    decoded by its Rust tokenizer directly: the wrapper around it costs 5x the decode itself
    (2.9 against 0.5 us for a window, twice a generated token, on the engine's thread)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(type(tokenizer), "_decode", None) is (
            PreTrainedTokenizerFast._decode):
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return partial(tokenizer.decode, skip_special_tokens=skip_special_tokens,
                   clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Turns a completion's tokens into text deltas as they are generated.

    Stop strings are matched on the text (also across token boundaries): the text from the
    earliest match on is never emitted, and while the tail of the text could still grow into a
    stop string it is held back (flushed by finish() if generation ends otherwise).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a string")
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._decode_window = window_decoder(tokenizer, skip_special_tokens)
        self._stop = tuple(stop)
        context = [int(t) for t in list(prompt_token_ids)[-_PROMPT_CONTEXT:]]
        self._ids = context
        self._prefix_offset = 0  # the window starts here (context for the read part)
        self._read_offset = len(context)  # tokens before this have been turned into text
        self._prefix_text = self._decode(context)  # decode(ids[prefix_offset:read_offset])
        self._held = ""  # decoded, not emitted: it may be the start of a stop string
        self._chunks: list[str] = []
        self._text: str | None = ""
        self._finished = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text emitted so far (without held-back text or a stop string)."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Take newly generated tokens and return the new text to emit ("" once a stop string
        matched). Do not pass a stop token id that ended generation: it is not part of the
        text."""
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self.stop_reason is not None:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        self._held += self._decode_new(final=False)
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush the text held back (an incomplete character, the start of a stop string), when
        generation ends for a reason other than a stop string; "" after a stop string."""
        if self._finished or self.stop_reason is not None:
            self._finished = True
            return ""
        self._finished = True
        self._held += self._decode_new(final=True)
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        text = self._decode_window(ids)
        if not isinstance(text, str):  # decode returns a list only for a batch of sequences
            raise TypeError(f"the tokenizer decoded one sequence into {type(text).__name__}")
        return text

    def _decode_new(self, final: bool) -> str:
        """The text of the tokens after the read offset, once it is complete (or final)."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset:])
        incomplete = len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR)
        if incomplete and not final and len(self._ids) - self._read_offset < _MAX_HELD_TOKENS:
            return ""
        new_text = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:])
        return new_text

    def _emit(self, final: bool) -> str:
        """Emit the held text up to a stop string, or up to a tail that may start one."""
        held = self._held
        match = self._find_stop(held)
        if match is not None:
            position, self.stop_reason = match
            emitted, self._held = held[:position], ""
        else:
            keep = 0 if final else self._stop_prefix_length(held)
            emitted, self._held = held[:len(held) - keep], held[len(held) - keep:]
        if emitted:
            self._chunks.append(emitted)
            self._text = None
        return emitted

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in `text` (the first listed among those at one position).
        Searching the held text suffices: a match cannot start in text already emitted, since
        that was emitted only when no stop string could start there."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            position = text.find(stop)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
