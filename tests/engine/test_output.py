"""TextState: stop strings found across token boundaries, and never released in part."""

from __future__ import annotations

from collections.abc import Sequence

from levante.engine.output import TextState


class CharTokenizer:
    """Each token id is one character (ids are code points): splits are fully controlled."""

    vocab_size = 0x110000
    bos_id = None
    eos_ids = frozenset()
    should_add_bos = False

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def is_special(self, token_id: int) -> bool:
        return False


def _stream(text: str, stop: tuple[str, ...], include: bool = False) -> tuple[list[str], bool]:
    state = TextState(CharTokenizer(), [], stop, include_stop=include)
    released = []
    for ch in text:
        stopped = state.add(ord(ch))
        released.append(state.take(final=stopped))
        if stopped:
            return released, True
    released.append(state.take(final=True))
    return released, False


def test_stop_split_across_tokens_never_leaks() -> None:
    released, stopped = _stream("Hello END world", ("END",))
    assert stopped and "".join(released) == "Hello "
    assert all("E" not in r and "N" not in r for r in released)


def test_partial_prefix_released_once_it_cannot_match() -> None:
    released, stopped = _stream("an ENvelope", ("END",))
    assert not stopped and "".join(released) == "an ENvelope"
    # "EN" was held back while it could still become "END"
    assert released[3] == "" and released[4] == "" and released[5] == "ENv"


def test_earliest_of_several_stops_and_include() -> None:
    released, _ = _stream("abc STOP def END", ("END", "STOP"))
    assert "".join(released) == "abc "
    released, _ = _stream("abc STOP def", ("STOP",), include=True)
    assert "".join(released) == "abc STOP"
