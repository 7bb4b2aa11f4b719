"""The official openai client against a live server: chat, completions, streams, n, seeds."""

from __future__ import annotations

import asyncio

import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def test_models_lists_the_served_name(client) -> None:
    assert "smollm2" in [m.id for m in client.models.list().data]


def test_chat_completion(client, server) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24,
                                       temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = server.state.bundle.chat_format.encode(MESSAGES)
    assert r.usage.prompt_tokens == len(prompt_ids)
    generated = server.state.bundle.tokenizer.encode(choice.message.content)
    assert r.usage.completion_tokens >= len(generated)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_length_finish_and_usage(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=3,
                                       temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_streaming_equals_whole(client) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=20,
                                           temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_text_and_token_ids(client, server) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    ids = server.state.bundle.tokenizer.encode("The capital of France is")
    r2 = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == r2.choices[0].text and r.choices[0].text.strip()
    assert r.usage.prompt_tokens == len(ids)


def test_stop_string_is_cut(client) -> None:
    base = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = base.strip()[2:4] if len(base.strip()) > 4 else base.strip()[:1]
    r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and base.startswith(r.choices[0].text)


def test_n_and_seeds(client) -> None:
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=42)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_logprobs(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_async_client_concurrent_requests(server) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none",
                                    max_retries=0)
        rs = await asyncio.gather(*(client.chat.completions.create(
            model="smollm2", messages=MESSAGES, max_tokens=10, temperature=0)
            for _ in range(4)))
        return [r.choices[0].message.content for r in rs]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1


def test_batched_equals_alone(server) -> None:
    """8 concurrent greedy requests of different lengths equal the same requests one by one."""
    prompts = [f"Write about item {i}: " + "word " * (3 * i) for i in range(8)]

    async def run(concurrent: bool) -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none",
                                    max_retries=0)

        async def one(p: str) -> str:
            r = await client.completions.create(model="smollm2", prompt=p, max_tokens=16,
                                                temperature=0)
            return r.choices[0].text

        if concurrent:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        return [await one(p) for p in prompts]

    assert asyncio.run(run(True)) == asyncio.run(run(False))
    server.wait_idle()
    assert server.engine.pool.num_free == server.engine.pool.num_blocks
