"""The official openai client against a live server: chat, completions, streams, n, seeds."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


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


# --- the agent loop: tools -> the model's call -> its result -> an answer (issue 19) --------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


def _call_and_answer(client, messages: list[dict], *, stream: bool, **kwargs):
    """(content, tool calls as dicts, finish_reason) of one chat completion."""
    kwargs = dict(model="smollm2", messages=messages, tools=[WEATHER], temperature=0,
                  **kwargs)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        message = choice.message
    else:  # chunks joined by hand: the client's stream() helper raises at finish "length"
        content, parts, finish = "", {}, None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    part = parts.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                    part["id"] = call.id or part["id"]
                    if call.function:
                        part["name"] += call.function.name or ""
                        part["arguments"] += call.function.arguments or ""
                finish = choice.finish_reason or finish
        calls = [{"id": p["id"], "type": "function",
                  "function": {"name": p["name"], "arguments": p["arguments"]}}
                 for _, p in sorted(parts.items())]
        return content or None, calls, finish
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in message.tool_calls or []]
    return message.content, calls, choice.finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("content", [None, ""])
def test_agent_loop_with_tool_results(client, server, stream: bool, content: str | None
                                      ) -> None:
    """The call the model made and the tool's result both reach the next prompt (they failed
    with a 400 for content null, and silently vanished for content "")."""
    _, calls, finish = _call_and_answer(client, ASK_WEATHER, stream=stream,
                                        tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=60)
    assert finish == "tool_calls" and calls and calls[0]["function"]["name"] == "get_weather"
    history = [*ASK_WEATHER, {"role": "assistant", "content": content, "tool_calls": calls},
               *({"role": "tool", "tool_call_id": c["id"], "content": "22C and sunny"}
                 for c in calls)]
    answer, more_calls, finish = _call_and_answer(client, history, stream=stream,
                                                  tool_choice="none", max_tokens=16,
                                                  extra_body={"min_tokens": 2})
    assert answer and not more_calls and finish in ("stop", "length")

    prompt_ids = server.state.chats.prepare(history, tools=[WEATHER],
                                            tool_choice="none").prompt_ids
    prompt = server.state.bundle.tokenizer.decode(prompt_ids, skip_special=False)
    arguments = json.loads(calls[0]["function"]["arguments"])
    call_text = json.dumps({"tool_calls": [{"name": c["function"]["name"],
                                            "arguments": json.loads(c["function"]["arguments"])}
                                           for c in calls]}, ensure_ascii=False)
    result_text = json.dumps({"tool_call_id": calls[0]["id"], "name": "get_weather",
                              "content": "22C and sunny"})
    assert f"<|im_start|>assistant\n{call_text}<|im_end|>" in prompt
    assert f"<|im_start|>tool\n{result_text}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and "city" in arguments
    # the server answered that very prompt
    r = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=1)
    assert r.usage.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize(("messages", "index", "match"), [
    ([*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": '}}]}],
     1, "not valid JSON"),
    ([*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '["Paris"]'}}]}],
     1, "must be a JSON object"),
    ([*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
      {"role": "tool", "tool_call_id": "call_2", "content": "22C"}],
     2, "tool_call_id 'call_2' matches no tool call"),
    ([*ASK_WEATHER, {"role": "tool", "tool_call_id": "call_1", "content": "22C"}],
     1, "tool_call_id 'call_1' matches no tool call"),
])
def test_malformed_tool_turns_are_400_naming_the_message(
        client, messages: list[dict], index: int, match: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                       max_tokens=4)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"messages[{index}]: ") and match in error["message"]


def test_metrics_count_what_the_engine_did(client, server) -> None:
    """/metrics carries the engine's counters under vLLM's names: prefix-cache queries and
    hits (the second identical prompt is served from the first's blocks), drafts, errors."""
    import httpx

    def sample(name: str) -> float:
        text = httpx.get(server.base_url + "/metrics").text
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    before = sample("levante_prefix_cache_hits_total")
    messages = [{"role": "user", "content": "Name three colours of the rainbow, please. " * 8}]
    for _ in range(2):
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert sample("levante_prefix_cache_hits_total") - before >= 64
    assert sample("levante_prefix_cache_queries_total") >= sample("levante_prefix_cache_hits_total")
    # n = 3 on a new prompt: the choices join one step and two reuse the first one's prefill
    before = sample("levante_prefix_cache_hits_total")
    fresh = [{"role": "user", "content": "List four kinds of trees, in a row. " * 8}]
    reply = client.chat.completions.create(model="smollm2", messages=fresh, max_tokens=2, n=3)
    shared = (reply.usage.prompt_tokens - 1) // 16 * 16  # full blocks; the last token runs
    assert sample("levante_prefix_cache_hits_total") - before >= 2 * shared
    for name in ("levante_num_preemptions_total", "levante_spec_decode_num_draft_tokens_total",
                 "levante_spec_decode_num_accepted_tokens_total", "levante_request_errors_total"):
        assert sample(name) >= 0


def test_echo_scores_the_prompt_as_lm_eval_asks(server) -> None:
    """/v1/completions with echo, logprobs and max_tokens 0 (what lm-eval's loglikelihood
    sends): the prompt's text and each token's logprob given the tokens before it, equal to
    what a completion of that prefix reports for its next token."""
    import httpx

    prompt = "The capital of France is Paris. The capital of Italy is Rome."
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        ids = http.post("/v1/completions", json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 1,
            "temperature": 0}).json()["usage"]["prompt_tokens"]
        scored = http.post("/v1/completions", json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 0, "echo": True,
            "logprobs": 5, "temperature": 0}).json()
        choice = scored["choices"][0]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == ids and "".join(logprobs["tokens"]) == prompt
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
        prompt_ids = server.state.bundle.tokenizer.encode(prompt, add_bos=False)
        for m in (3, 9):  # the prefix's own completion reports the same distribution
            alone = http.post("/v1/completions", json={
                "model": "smollm2", "prompt": prompt_ids[:m], "max_tokens": 1,
                "temperature": 0, "logprobs": 5}).json()["choices"][0]["logprobs"]
            assert alone["top_logprobs"][0] == logprobs["top_logprobs"][m]
        # echo with generation: prompt then answer; text offsets count from the prompt's start
        both = http.post("/v1/completions", json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 3, "echo": True,
            "logprobs": 1, "temperature": 0}).json()["choices"][0]
        assert both["text"].startswith(prompt) and len(both["logprobs"]["tokens"]) == ids + 3
        assert both["logprobs"]["token_logprobs"][:ids] == logprobs["token_logprobs"]
        refused = http.post("/v1/completions", json={"model": "smollm2", "prompt": prompt,
                                                     "max_tokens": 0})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_prompt_logprobs_as_vllm_returns_them(client) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=2, temperature=0,
        extra_body={"prompt_logprobs": 2})
    scores = reply.choices[0].model_extra["prompt_logprobs"]
    assert scores[0] is None and len(scores) == reply.usage.prompt_tokens
    assert all(1 <= len(entry) <= 3 for entry in scores[1:])
    assert all(v["logprob"] <= 0 and v["decoded_token"] is not None
               for entry in scores[1:] for v in entry.values())


def test_tokenize_and_detokenize_as_vllm(server) -> None:
    import httpx

    tokenizer = server.state.bundle.tokenizer
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        text = http.post("/tokenize", json={"model": "smollm2", "prompt": "Hello, world!"}).json()
        assert text["tokens"] == tokenizer.encode("Hello, world!",
                                                  add_bos=tokenizer.should_add_bos)
        assert text["count"] == len(text["tokens"]) and text["max_model_len"] == 2048
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        reply = http.post("/v1/chat/completions", json={
            "model": "smollm2", "messages": MESSAGES, "max_tokens": 1}).json()
        assert chat["count"] == reply["usage"]["prompt_tokens"]
        back = http.post("/detokenize", json={"model": "smollm2", "tokens": text["tokens"]})
        assert back.json() == {"prompt": "Hello, world!"}
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        both = http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES})
        assert both.status_code == 400
        unknown = http.post("/tokenize", json={"model": "nope", "prompt": "a"})
        assert unknown.status_code == 404


def test_every_response_carries_a_request_id(server) -> None:
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        mine = http.get("/v1/models", headers={"x-request-id": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        fresh = {http.get("/health").headers["x-request-id"] for _ in range(2)}
        assert len(fresh) == 2 and all(len(i) == 32 for i in fresh)
        refused = http.post("/v1/completions", json={"model": "smollm2"},
                            headers={"x-request-id": "bad id\twith tab"})
        assert refused.status_code == 400 and refused.headers["x-request-id"] != "bad id\twith tab"
        streamed = http.post("/v1/completions", json={
            "model": "smollm2", "prompt": "Hi", "max_tokens": 2, "stream": True},
            headers={"x-request-id": "stream-1"})
        assert streamed.headers["x-request-id"] == "stream-1"


def test_continuous_usage_stats_on_every_chunk(server) -> None:
    import json

    import httpx

    body = {"model": "smollm2", "prompt": "Count: one, two,", "max_tokens": 5,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    prompt = usages[0]["prompt_tokens"]
    generated = [u["completion_tokens"] for u in usages[:-1]]
    assert generated == sorted(generated) and generated[-1] == 5
    assert usages[-1] == {"prompt_tokens": prompt, "completion_tokens": 5,
                          "total_tokens": prompt + 5}


def test_logprobs_report_the_model_not_the_bias(client, server) -> None:
    """logit_bias forces the token; its reported logprob stays the model's own (OpenAI's
    convention), the same as an echo of the prompt with that token scores it."""
    token = server.state.bundle.tokenizer.encode(" zebra")[0]
    prompt = "The capital of France is"
    biased = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1,
                                       temperature=0, logprobs=1,
                                       logit_bias={str(token): 100})
    assert biased.choices[0].text == server.state.bundle.tokenizer.decode([token])
    reported = biased.choices[0].logprobs.token_logprobs[0]
    scored = client.completions.create(model="smollm2", prompt=prompt + biased.choices[0].text,
                                       max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert reported < -3 and reported == scored.choices[0].logprobs.token_logprobs[-1]
