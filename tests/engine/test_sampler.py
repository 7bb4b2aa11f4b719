"""Tests for SamplingParams validation and the batched Sampler, against transformers' warpers."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from levante.engine.sampler import Sampler, filter_logits, make_generator
from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestError

NAN, INF = float("nan"), float("inf")
EOS = 2


def sample(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], *,
           outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
           generators: list[torch.Generator | None] | None = None,
           allowed: torch.Tensor | None = None):
    num_rows = len(params)
    return sampler(logits, params, prompt_ids=prompts or [[]] * num_rows,
                   output_ids=outputs or [[]] * num_rows,
                   generators=generators or [None] * num_rows, allowed=allowed)


def process(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], *,
            prompts: list[list[int]], outputs: list[list[int]]) -> torch.Tensor:
    return sampler.process_logits(logits, params, prompt_ids=prompts, output_ids=outputs)


def draws(logits_row: torch.Tensor, params: SamplingParams, num_draws: int,
          seed: int = 0) -> Counter[int]:
    """Token counts of `num_draws` samples of one distribution, drawn as one batch."""
    sampler = Sampler(logits_row.shape[-1], seed=seed)
    batch = logits_row.expand(num_draws, -1).contiguous()
    return Counter(sample(sampler, batch, [params] * num_draws).token_ids)


# --- SamplingParams ------------------------------------------------------------------------

BAD_PARAMS = [
    ("max_tokens", 0), ("max_tokens", 1.5), ("min_tokens", -1), ("temperature", -0.1),
    ("temperature", NAN), ("temperature", INF), ("temperature", 100.5), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", NAN), ("top_k", 0), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", 10.5),
    ("repetition_penalty", NAN), ("presence_penalty", 2.5), ("presence_penalty", -INF),
    ("frequency_penalty", -2.01), ("seed", -1), ("seed", 2**63), ("stop", ["x"]),
    ("stop", "x"), ("stop", ("",)), ("stop", ("x" * 257,)), ("stop", ("s",) * 17),
    ("stop_token_ids", (-1,)), ("stop_token_ids", [2]), ("ignore_eos", 1),
    ("include_stop_str_in_output", "yes"), ("logprobs", 21), ("logprobs", -1),
    ("logit_bias", {1: 1.0}), ("logit_bias", ((1, 101.0),)), ("logit_bias", ((1, NAN),)),
    ("logit_bias", ((-1, 1.0),)), ("logit_bias", ((1, 1.0), (1, 2.0))),
    ("logit_bias", ((1, 2, 3),)), ("logit_bias", tuple((i, 1.0) for i in range(301))),
    ("n", 0), ("n", 17),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS)
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert field in str(info.value)


def test_invalid_float_message_shows_the_value() -> None:
    with pytest.raises(RequestError, match=r"temperature must be a finite number in \[0, 100\], "
                                           r"got nan"):
        SamplingParams(temperature=NAN)
    with pytest.raises(RequestError, match="min_tokens") as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"


def test_params_defaults_normalization_and_replace() -> None:
    params = SamplingParams(temperature=1, logit_bias=((9, 1), (3, -2.5)))
    assert isinstance(params.temperature, float)
    assert params.logit_bias == ((3, -2.5), (9, 1.0))
    assert hash(params) == hash(SamplingParams(temperature=1.0, logit_bias=((3, -2.5), (9, 1.0))))
    assert not params.is_greedy
    assert params.replace(temperature=0).is_greedy and params.replace(top_k=1).is_greedy
    assert params.replace(temperature=1e-30).is_greedy
    assert not params.replace(temperature=0.01).is_greedy
    assert params.replace(max_tokens=None).max_tokens is None
    with pytest.raises(RequestError):
        params.replace(top_p=2.0)
    with pytest.raises(RequestError) as info:
        SamplingParams(logit_bias=((49152, 1.0),)).check_token_ids(49152)
    assert info.value.param == "logit_bias"


def test_make_generator() -> None:
    assert make_generator(None) is None
    first, second = make_generator(7), make_generator(7)
    assert first is not None and second is not None
    assert torch.equal(torch.rand(5, generator=first), torch.rand(5, generator=second))


# --- greedy, temperature, filters -------------------------------------------------------------

def test_greedy_is_argmax_and_leaves_the_input_alone() -> None:
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    out = sample(Sampler(1000), logits, [SamplingParams(temperature=0.0)] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6
    top1 = sample(Sampler(1000), logits, [SamplingParams(top_k=1, temperature=5.0)] * 6)
    assert top1.token_ids == out.token_ids
    assert torch.equal(logits, before)


def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -2.0]])
    num_draws, temperature = 4000, 0.7
    counts = draws(logits, SamplingParams(temperature=temperature), num_draws)
    expected = torch.softmax(logits[0] / temperature, dim=-1) * num_draws
    chi2 = sum((counts[i] - expected[i].item()) ** 2 / expected[i].item() for i in range(5))
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    flatter = draws(logits, SamplingParams(temperature=3.0), num_draws)
    assert flatter[4] > counts[4] * 2  # a higher temperature lifts the unlikely tail


PROBS = [0.07, 0.5, 0.03, 0.25, 0.15]  # unsorted on purpose


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.4, {1}), (0.6, {1, 3}), (0.85, {1, 3, 4}), (0.95, {1, 3, 4, 0}), (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_minimal_nucleus(top_p: float, expected: set[int]) -> None:
    logits = torch.tensor([PROBS]).log()
    assert set(draws(logits, SamplingParams(top_p=top_p), 3000)) == expected


@pytest.mark.parametrize(("min_p", "expected"), [(0.2, {1, 3, 4}), (0.1, {0, 1, 3, 4}),
                                                 (0.55, {1})])
def test_min_p_keeps_tokens_above_a_fraction_of_the_max(min_p: float, expected: set[int]) -> None:
    logits = torch.tensor([PROBS]).log()
    assert set(draws(logits, SamplingParams(min_p=min_p), 3000)) == expected


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = torch.tensor([PROBS]).log()
    assert set(draws(logits, SamplingParams(top_k=2), 2000)) == {1, 3}
    assert set(draws(logits, SamplingParams(top_k=3, top_p=0.6), 2000)) == {1, 3}


# Flat rows need the full sort; peaked ones settle among 256 candidates; (2.5, 20000) rows
# with top_p 0.9 settle among 4096 (the middle stage).
@pytest.mark.parametrize(("scale", "vocab_size"), [(0.3, 3000), (3.0, 3000), (2.5, 20000)])
def test_filters_match_transformers_warpers(scale: float, vocab_size: int) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, vocab_size, generator=gen) * scale
    settings = [(None, 0.9, 0.0), (50, 1.0, 0.0), (300, 0.8, 0.0), (None, 1.0, 0.05),
                (20, 0.5, 0.1), (None, 0.999, 0.0)]
    ours = filter_logits(logits.clone(), top_k=[s[0] for s in settings],
                         top_p=[s[1] for s in settings], min_p=[s[2] for s in settings])
    for row, (top_k, top_p, min_p) in enumerate(settings):
        reference = logits[row:row + 1].clone()
        if top_k is not None:
            reference = TopKLogitsWarper(top_k)(None, reference)
        if top_p < 1.0:
            reference = TopPLogitsWarper(top_p)(None, reference)
        if min_p > 0.0:
            reference = MinPLogitsWarper(min_p)(None, reference)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(reference[0])), row
        kept = ~torch.isinf(reference[0])
        assert torch.equal(ours[row][kept], logits[row][kept])


# --- logits processing ---------------------------------------------------------------------

def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 50, generator=gen) * 2
    prompts, outputs = [[1, 5, 7, 7], [0, 49, 3]], [[9, 5, 30], [3, 3, 12, 40]]
    penalties = [1.3, 0.7]
    ours = process(Sampler(50), logits, [SamplingParams(repetition_penalty=p) for p in penalties],
                   prompts=prompts, outputs=outputs)
    for row, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        reference = processor(input_ids, logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row], reference[0], rtol=0, atol=0)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(5))
    prompt, output = [4, 4, 6], [1, 1, 1, 6, 8]
    params = SamplingParams(presence_penalty=0.6, frequency_penalty=-0.4)
    ours = process(Sampler(20), logits, [params], prompts=[prompt], outputs=[output])
    expected = logits[0].clone()
    for token_id, count in Counter(output).items():  # prompt tokens do not count
        expected[token_id] -= count * -0.4 + 0.6
    torch.testing.assert_close(ours[0], expected)


def test_logit_bias_adds_and_steers_greedy() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=0, logit_bias=((3, 100.0), (7, -1.5))), SamplingParams()]
    ours = process(Sampler(30), logits, params, prompts=[[], []], outputs=[[], []])
    expected = logits.clone()
    expected[0, 3] += 100.0
    expected[0, 7] -= 1.5
    torch.testing.assert_close(ours, expected)
    assert sample(Sampler(30), logits, params[:1] * 2).token_ids == [3, 3]


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(4, 10)
    logits[:, EOS] = 50.0
    logits[:, 5] = 40.0
    sampler = Sampler(10, frozenset({EOS}))
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,)),
              SamplingParams(temperature=0, min_tokens=2),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))]
    out = sample(sampler, logits, params, outputs=[[1], [1], [1], [1, 1]])
    assert out.token_ids == [0, 5, EOS, EOS]


def test_allowed_mask_is_never_violated() -> None:
    gen = torch.Generator().manual_seed(7)
    num_rows, vocab_size = 400, 64
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 5
    allowed = torch.rand(num_rows, vocab_size, generator=gen) < 0.1
    allowed[:, 0] = True
    params = [SamplingParams(temperature=100.0, logit_bias=((1, 100.0),), presence_penalty=-2.0)]
    out = sample(Sampler(vocab_size, seed=0), logits, params * num_rows,
                 outputs=[[1, 2, 3]] * num_rows, allowed=allowed)
    assert all(allowed[row, token].item() for row, token in enumerate(out.token_ids))
    assert len(set(out.token_ids)) > 10  # really sampled, not stuck on one token


def test_min_tokens_against_a_grammar_that_must_stop_is_an_error() -> None:
    allowed = torch.zeros(1, 8, dtype=torch.bool)
    allowed[0, EOS] = True
    with pytest.raises(RequestError) as info:
        sample(Sampler(8, frozenset({EOS})), torch.zeros(1, 8), [SamplingParams(min_tokens=3)],
               allowed=allowed)
    assert info.value.param == "min_tokens"


# --- logprobs ----------------------------------------------------------------------------------

def test_logprobs_are_the_models_own_before_bias_and_penalties() -> None:
    """OpenAI reports the model's distribution: logit_bias and penalties steer the choice but
    not the reported logprobs; a grammar's forbidden tokens are at -inf."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 100, generator=gen) * 3
    allowed = torch.ones(3, 100, dtype=torch.bool)
    allowed[2, 3:] = False  # only 3 tokens left: fewer alternatives than asked for
    params = [SamplingParams(temperature=0.5, logprobs=5, logit_bias=((11, 50.0),),
                             frequency_penalty=1.5),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(logprobs=20)]
    out = sample(Sampler(100, seed=1), logits, params, allowed=allowed,
                 outputs=[[int(logits[0].argmax())], [], []], prompts=[[1], [1], [1]])
    assert out.token_ids[0] == 11  # the bias chose it
    processed = logits.clone()
    processed[2, 3:] = -INF
    expected = processed.log_softmax(dim=-1)
    for row in range(3):
        assert out.logprobs[row] == pytest.approx(expected[row, out.token_ids[row]].item(),
                                                  abs=1e-5)
    top = out.top_logprobs[0]
    assert [token for token, _ in top] == expected[0].topk(5).indices.tolist()
    assert [value for _, value in top] == sorted((value for _, value in top), reverse=True)
    assert [value for _, value in top] == pytest.approx(expected[0].topk(5).values.tolist(),
                                                        abs=1e-5)
    assert out.top_logprobs[1] == []
    assert {token for token, _ in out.top_logprobs[2]} == {0, 1, 2}
    assert sum(math.exp(value) for _, value in out.top_logprobs[2]) == pytest.approx(1.0)


# --- seeds and batching -------------------------------------------------------------------------

def run_steps(rows: list[SamplingParams], target: int, num_steps: int = 50) -> list[int]:
    """Tokens of row `target` over `num_steps` decode steps with fresh logits every step."""
    vocab_size = 500
    sampler = Sampler(vocab_size)
    generators = [make_generator(p.seed) for p in rows]
    logits_gen = torch.Generator().manual_seed(99)
    outputs: list[list[int]] = [[] for _ in rows]
    for _ in range(num_steps):
        logits = torch.randn(len(rows), vocab_size, generator=logits_gen)
        logits[target] = torch.randn(vocab_size, generator=torch.Generator().manual_seed(
            len(outputs[target])))  # the target row sees the same logits in every batch
        out = sample(sampler, logits, rows, outputs=outputs, prompts=[[1, 2]] * len(rows),
                     generators=generators)
        for row, token in enumerate(out.token_ids):
            outputs[row].append(token)
    return outputs[target]


def test_seeded_row_is_reproducible_and_batch_independent() -> None:
    seeded = SamplingParams(seed=1234, temperature=1.5, top_p=0.95, repetition_penalty=1.2)
    alone = run_steps([seeded], 0)
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5),
              SamplingParams(seed=1, top_p=0.5)]
    assert run_steps([seeded], 0) == alone
    assert run_steps([others[0], seeded, *others[1:]], 1) == alone
    assert run_steps([*others, seeded], 3) == alone
    assert run_steps([seeded.replace(seed=4321)], 0) != alone
    assert len(set(alone)) > 10


def test_mixed_params_in_one_batch_act_per_row() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 40, generator=gen)
    peaked = torch.tensor(PROBS).log()
    logits[3, :5], logits[3, 5:] = peaked, -INF
    params = [SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias=((17, 50.0),)),
              SamplingParams(top_k=1), SamplingParams(top_p=0.6, seed=3),
              SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)]
    outputs = [[], [], [], [], [int(logits[4].argmax())] * 3]
    out = sample(Sampler(40), logits, params, outputs=outputs,
                 generators=[make_generator(p.seed) for p in params])
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == 17
    assert out.token_ids[2] == int(logits[2].argmax())
    assert out.token_ids[3] in {1, 3}
    penalized = logits[4].clone()
    penalized[outputs[4][0]] -= 2.0 + 3 * 2.0
    assert out.token_ids[4] == int(penalized.argmax()) != outputs[4][0]


def test_running_token_counts_equal_counting_the_lists() -> None:
    """Penalties from per-request running counts (updated as tokens arrive) equal a fresh
    count of the prompt and output lists, step after step."""
    from levante.engine.penalties import TokenCounts

    gen = torch.Generator().manual_seed(9)
    params = [SamplingParams(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.5),
              SamplingParams(), SamplingParams(frequency_penalty=-0.2)]
    prompts = [[1, 5, 7, 7], [2, 3], [40, 41, 40]]
    outputs: list[list[int]] = [[], [], []]
    counts = [TokenCounts(50, p, torch.device("cpu")) for p in prompts]
    sampler = Sampler(50)
    for _ in range(12):
        logits = torch.randn(3, 50, generator=gen)
        running = sampler.process_logits(logits, params, prompt_ids=prompts, output_ids=outputs,
                                         counts=counts)
        fresh = sampler.process_logits(logits, params, prompt_ids=prompts, output_ids=outputs)
        assert torch.equal(running, fresh)
        for out in outputs:
            out.extend(torch.randint(0, 50, (int(torch.randint(1, 3, ())),), generator=gen).tolist())
