"""Output text of a request: incremental detokenization, stop strings, and safe streaming."""

from __future__ import annotations

from collections.abc import Sequence

from levante.tokenizer import IncrementalDetokenizer, Tokenizer


class StopStrings:
    """Text cut at the first stop string, released without a tail that may begin one.

    Streaming never shows a prefix of a stop string that might still complete: with stop
    "END" and text "foo EN", only "foo " is released until more text decides.
    """

    def __init__(self, stop: Sequence[str], *, include_stop: bool = False) -> None:
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.text = ""
        self.num_released = 0
        self.is_stopped = False

    def add(self, text: str) -> bool:
        """Append text (ignored once stopped); True if a stop string now appears (text cut)."""
        if self.is_stopped or not text:
            return False
        before = len(self.text)
        self.text += text
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        window_start = max(0, before - longest + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:index + len(stop)] if self.include_stop else self.text[:index]
        self.is_stopped = True
        return True

    def take(self, *, final: bool) -> str:
        """Text not yet released; while running, minus a tail that may begin a stop string."""
        end = len(self.text) if final or self.is_stopped else len(self.text) - self._held()
        delta = self.text[self.num_released:end]
        self.num_released = max(self.num_released, end)
        return delta

    def _held(self) -> int:
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return held


class TextState:
    """Decoded text of one request, with its stop strings (`StopStrings`)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str],
                 *, include_stop: bool = False) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(stop, include_stop=include_stop)

    @property
    def text(self) -> str:
        return self.stops.text

    @property
    def is_stopped(self) -> bool:
        return self.stops.is_stopped

    def add(self, token_id: int) -> bool:
        """Append a token's text; True if a stop string now appears (text cut there)."""
        return self.stops.add(self.detokenizer.add(token_id))

    def take(self, *, final: bool) -> str:
        """Text not yet released; while running, minus a tail that may begin a stop string."""
        if final and not self.stops.is_stopped:
            self.stops.add(self.detokenizer.flush())
        return self.stops.take(final=final)
