"""Incremental detokenization and stop strings for one completion.

Text is decoded from a short window of recent output ids, not from the whole output:

    output ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                       └─ already emitted ──┘ └─ not yet emitted ──┘

``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text. The window only
moves when that text is final:

- it must not end in U+FFFD, so a UTF-8 character split across byte-level tokens is never
  emitted half-done;
- the last decoded token must not be a byte-fallback piece (``<0xNN>``): the ByteFallback decoder
  judges a whole run of byte pieces at once and turns every byte of an invalid run into U+FFFD,
  so one more byte piece can change how the run already decoded.

The window therefore always starts where decoding restarts cleanly, so summing the pieces gives
exactly ``decode(all output ids)``: a leading space that SentencePiece strips at the start of the
output is stripped here too, and nowhere else.
(``tokenizers.decoders.DecodeStream`` is not used: it cannot flush a trailing incomplete
sequence when the request ends, which ``decode`` renders as U+FFFD, and after emitting a valid
byte-fallback run that a later byte piece invalidates it raises "Invalid prefix" on every step.)

Per step the work is proportional to the window and the new text, never to the whole output.
A completion whose text nobody reads before it ends (FINAL_ONLY output, no stop strings: the
offline ``LLM.generate``) is decoded once, when it finishes.
"""

from __future__ import annotations

from tureen.sampling_params import RequestOutputKind, SamplingParams
from tureen.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what decode gives for bytes that do not (yet) form a character


class _Chunks:
    """Append-only text in pieces, with O(removed) truncation from the end."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.length = 0

    def append(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.length += len(text)

    def drop_last(self, count: int) -> None:
        while count > 0:
            piece = self.pieces.pop()
            keep = max(len(piece) - count, 0)
            count -= len(piece) - keep
            self.length -= len(piece) - keep
            if keep:
                self.pieces.append(piece[:keep])

    def text(self) -> str:
        joined = "".join(self.pieces)
        self.pieces = [joined] if joined else []  # later calls are O(new pieces)
        return joined


class IncrementalDetokenizer:
    """Turns one completion's token ids into text, finds stop strings, and hands out text deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        # prompt_token_ids are not used as decoding context on purpose: the output text must equal
        # decode(output ids) alone, and stop strings only ever match generated text.
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None  # the stop string that ended the text, if any
        self._skip_special = params.skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._flushed = False
        self._text = _Chunks()  # the output text
        self._unsent = _Chunks()  # its tail that take_delta has not handed out yet
        self._stops = list(params.stop or [])
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""  # the last `_hold` characters of the text, where a stop string may have begun
        # Nobody reads the text before the end (one final output, no stop string to look for):
        # decode once in finish() instead of once per token. The result is the same text.
        self._deferred = not self._stops and params.output_kind == RequestOutputKind.FINAL_ONLY

    @property
    def output_text(self) -> str:
        """All text so far (after a stop string, the text up to it)."""
        return self._text.text()

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add generated ids; returns the stop string if the text now contains one, else None."""
        if self.stopped or self._flushed or not new_token_ids:
            return None
        if self._deferred:
            self.token_ids += new_token_ids
            return None
        # One id at a time, so complete characters are released even if the batch ends mid-character.
        pieces = []
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            pieces.append(self._decode_new())
        return self._add_text("".join(pieces))

    def finish(self) -> None:
        """The request is over: emit the text still held back (an incomplete character decodes as
        U+FFFD). A stop string completed by that text still truncates it and sets ``stop_reason``."""
        if self._flushed:
            return
        self._flushed = True
        if not self.stopped and self._read_offset < len(self.token_ids):
            window = self.tokenizer.decode(self.token_ids[self._prefix_offset:], self._skip_special)
            self._read_offset = len(self.token_ids)
            self._add_text(window[len(self._prefix_text):])

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. Until ``finished``, the last ``max(len(stop)) - 1`` characters are
        withheld, since they may be the start of a stop string that later text would complete."""
        if finished:
            self.finish()
        hold = 0 if finished or self.stopped else self._hold
        unsent = self._unsent.text()
        cut = max(len(unsent) - hold, 0)
        self._unsent = _Chunks()
        self._unsent.append(unsent[cut:])
        return unsent[:cut]

    def _decode_new(self) -> str:
        """The text the ids after ``read_offset`` add, or "" while it ends in a partial character."""
        window = self.tokenizer.decode(self.token_ids[self._prefix_offset:], self._skip_special)
        if len(window) <= len(self._prefix_text) or window.endswith(_INCOMPLETE) or self._in_byte_run():
            return ""
        new_text = window[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._prefix_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:], self._skip_special)
        return new_text

    def _in_byte_run(self) -> bool:
        """Whether the last token that decoding keeps is a byte-fallback piece."""
        skipped = self.tokenizer.skipped_special_ids if self._skip_special else frozenset()
        for token_id in reversed(self.token_ids[self._read_offset:]):
            if token_id not in skipped:
                return token_id in self._byte_ids
        return False  # only skipped specials since the last boundary: decoding restarts cleanly there

    def _add_text(self, new_text: str) -> str | None:
        if not new_text:
            return None
        self._text.append(new_text)
        self._unsent.append(new_text)
        if not self._stops:
            return None
        region = self._tail + new_text  # every place a stop string could newly end
        match = _first_match(region, self._stops)
        if match is None:
            self._tail = region[-self._hold:] if self._hold else ""
            return None
        start, stop = match
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        self._truncate(self._text.length - (len(region) - end))
        self.stop_reason = stop
        return stop

    def _truncate(self, length: int) -> None:
        dropped = self._text.length - length
        self._text.drop_last(dropped)
        # Withholding guarantees the match starts in text that was never handed out.
        self._unsent.drop_last(min(dropped, self._unsent.length))


def _first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` (the first listed wins a tie), as (index, stop)."""
    found = [(index, order, stop) for order, stop in enumerate(stops) if (index := text.find(stop)) >= 0]
    if not found:
        return None
    index, _, stop = min(found)
    return index, stop
