"""Output text of a request: incremental detokenization, stop strings, and safe streaming."""

from __future__ import annotations

from collections.abc import Sequence

from levante.tokenizer import IncrementalDetokenizer, Tokenizer


class TextState:
    """Decoded text of one request; finds stop strings and holds back a possible partial one.

    Streaming never shows a prefix of a stop string that might still complete: with stop
    "END" and text "foo EN", only "foo " is released until the next token decides.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str],
                 *, include_stop: bool = False) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.text = ""
        self.num_released = 0
        self.is_stopped = False

    def add(self, token_id: int) -> bool:
        """Append a token's text; True if a stop string now appears (text cut there)."""
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
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
        if final and not self.is_stopped:
            self.text += self.detokenizer.flush()
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
