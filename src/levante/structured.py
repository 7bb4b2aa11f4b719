"""llguidance matchers -> token masks: a compiled `Grammar`, one `Matcher` per sequence, and
`fill_masks` for a whole batch at once (llguidance, in parallel threads). What a request's
grammar is, and how it is built from response_format and tools: levante.chat.grammars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from levante.errors import RequestError
from levante.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer

if TYPE_CHECKING:
    import llguidance

    from levante.chat.grammars import GrammarCompiler

# llguidance is imported where a grammar is first used, not at import: a process that never
# constrains output (`levante generate`) saves its ~3 MB of RSS. Never llguidance.torch: it
# pulls in sympy etc. (+118 MB RSS); llguidance.numpy does the same work.


def parser_limits() -> llguidance.LLParserLimits:
    """Bounds on grammar size and per-step work (llguidance's "fuel", ~14-50k units per ms).

    Compilation stops at max_grammar_size symbols and initial_lexer_fuel (~20 ms of lexer
    building); a mask step at step_lexer_fuel / step_max_items (~10 ms). A grammar over them
    fails to compile (a 400) or puts its matcher in an error state (that request fails).
    """
    import llguidance

    return llguidance.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=200_000, step_max_items=50_000,
                                     max_lexer_states=50_000, max_grammar_size=100_000,
                                     verbose_errors=False)


def llguidance_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (0.2-0.5 s to build: GrammarCompiler keeps one)."""
    if isinstance(tokenizer, MistralTokenizer):
        # mistral-common's adapter spells control tokens "<TOOL_CALLS>" as llguidance wants.
        from mistral_common.guidance.tokenizer import from_mistral_tokenizer

        return from_mistral_tokenizer(tokenizer.mistral)
    if isinstance(tokenizer, HFTokenizer):
        if not tokenizer.eos_ids:
            raise ValueError("this tokenizer has no EOS token, which llguidance needs")
        backend = tokenizer.backend  # a copy without padding/truncation, as llguidance.hf does
        backend = type(backend).from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        import llguidance

        return llguidance.LLTokenizer(backend.to_str(), n_vocab=tokenizer.vocab_size,
                                      eos_token=sorted(tokenizer.eos_ids))
    raise TypeError(f"no llguidance tokenizer for {type(tokenizer).__name__}")


class Grammar:
    """A compiled constraint, shared by all sequences of all requests that ask for it."""

    def __init__(self, compiler: GrammarCompiler, lark: str, *, param: str) -> None:
        self.compiler = compiler
        self.lark = lark
        import llguidance

        self._initial = llguidance.LLMatcher(
            compiler.ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(lark),
            limits=parser_limits(), log_level=0)
        if self._initial.is_error():
            raise RequestError(f"cannot compile the constraint: {self._initial.get_error()}",
                               param=param)

    def matcher(self) -> Matcher:
        """A fresh per-sequence matcher (a copy of the compiled start state: microseconds)."""
        return Matcher(self, self._initial.deep_copy())


class MatcherError(RuntimeError):
    """A matcher rejected a token or hit a resource limit: the sequence must fail."""


class Matcher:
    """One sequence's position in its grammar; advanced with each token the sequence gets."""

    def __init__(self, grammar: Grammar, ll_matcher: llguidance.LLMatcher) -> None:
        self.grammar = grammar
        self.ll_matcher = ll_matcher

    def consume(self, token_id: int) -> None:
        """Advance by one sampled token; MatcherError if the grammar does not allow it."""
        if not self.ll_matcher.consume_token(int(token_id)):
            raise MatcherError(f"the grammar rejected token {token_id}: "
                               f"{self.ll_matcher.get_error()}")

    @property
    def error(self) -> str | None:
        """Why the matcher stopped with an error (a rejected token, a parser limit), else None:
        an errored matcher is also `is_finished`, and its output is not complete."""
        return self.ll_matcher.get_error() or "unknown" if self.ll_matcher.is_error() else None

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow (so stop the sequence)."""
        return self.ll_matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete answer (it may also go on, e.g. free text)."""
        return self.ll_matcher.is_accepting()


def fill_masks(matchers: Sequence[Matcher | None], vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] bool (CPU): the tokens each row's grammar allows next; None rows: all.

    All rows' masks are computed together by llguidance's thread pool. Columns past the
    tokenizer's vocabulary (padded model vocabularies) are never allowed on constrained rows.
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return torch.ones(len(matchers), vocab_size, dtype=torch.bool)
    constrained: list[Matcher] = [matchers[row] for row in rows]  # type: ignore[misc]
    compiler = constrained[0].grammar.compiler
    assert all(m.grammar.compiler.vocab_size == compiler.vocab_size for m in constrained)
    bitmask = np.zeros((len(rows), (compiler.vocab_size + 31) // 32), dtype=np.int32)
    import llguidance.numpy

    llguidance.numpy.fill_next_token_bitmask_par(
        compiler.executor, [(m.ll_matcher, i) for i, m in enumerate(constrained)], bitmask)
    # Bit j of 32-bit word w is token 32w + j: as little-endian bytes, unpackbits' "little"
    # order (~0.2 ms for 8 x 131072; shifting in torch took ~50 ms here).
    width = min(vocab_size, compiler.vocab_size)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, count=width, bitorder="little")
    if len(rows) == len(matchers) and width == vocab_size:
        return torch.from_numpy(bits).view(torch.bool)
    allowed = np.ones((len(matchers), vocab_size), dtype=np.bool_)
    allowed[rows, width:] = False
    allowed[rows, :width] = bits.view(np.bool_)
    return torch.from_numpy(allowed)
