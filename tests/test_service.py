"""The whole service on a real local Ray cluster: two prefill replicas, one decode replica, in-memory index.

Started once per module through ``pdserve.up.start`` (what ``pdserve up`` runs).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import transformers_greedy, transformers_logprobs, wait_for, whitespace_banned
from service_client import LONG, prompt, service_config

from pdserve.local_redis import free_port
from pdserve.up import start
from pdserve_pb.v1 import generate_pb2 as pb

pytestmark = pytest.mark.service

MAX_INFLIGHT = 40  # requests one router replica serves at once; above it: RESOURCE_EXHAUSTED / 429


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    # A loose load bound: these tests send bursts of one prefix to a fresh router, and the default bound
    # (1.3x the fair share of recent placements, tested in test_placement.py) would spread them on purpose.
    overrides = {"service.prefill.num_replicas": 2, "router.placement.load_bound": 3.0,
                 "ray_metrics_export_port": free_port(), "service.max_inflight": MAX_INFLIGHT,
                 "engine.tool_call_parser": "hermes"}  # fmt: skip
    config = service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides)
    running = start(config, num_cpus=8)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' greedy continuation of a prompt, computed once per prompt."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def greedy(ids: list[int], n: int = 12) -> list[int]:
        key = (*ids, -n)
        if key not in cache:
            cache[key] = transformers_greedy(model_dir, ids, n)
        return cache[key]

    return greedy


def test_disaggregated_greedy_output_equals_transformers_over_grpc_and_http(client, reference):
    ids = prompt(150, 1)
    tokens, _, last = client.greedy(ids)
    assert last.timing.placement == "disaggregated" and last.timing.prefill_worker
    assert tokens == reference(ids)
    ids = prompt(150, 3)  # another prompt: the decode worker now holds the first one, and would prefill it itself
    status, body = client.post(
        "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    )
    assert status == 200 and body["pdserve"]["timing"]["placement"] == "disaggregated"
    assert body["pdserve"]["token_ids"] == reference(ids)
    assert body["usage"]["prompt_tokens"] == 150 and body["usage"]["completion_tokens"] == 12


def test_a_short_uncached_prompt_is_prefilled_on_the_decode_worker(client, reference):
    ids = prompt(LONG - 10, 2)
    tokens, _, last = client.greedy(ids)
    assert last.timing.placement == "local_prefill" and not last.timing.prefill_worker
    assert tokens == reference(ids)


def test_text_prompts_and_token_id_prompts_mean_the_same(client):
    text = "Once upon a time, in a land far away, there lived a small dragon who loved to read books."
    by_text, text_out, _ = client.generate(text, max_tokens=8, temperature=0.0)
    status, body = client.post("/v1/completions", {"prompt": text, "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["pdserve"]["token_ids"] == by_text and body["choices"][0]["text"] == text_out


def test_32_concurrent_streams_all_complete_correctly(client, reference):
    prompts = [prompt(60 + 10 * (i % 4), 10 + i % 4) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda ids: client.greedy(ids, 8)[0], prompts))
    assert all(got == reference(ids, 8) for got, ids in zip(results, prompts, strict=True))


def test_requests_sharing_a_long_prefix_land_on_the_prefill_replica_that_holds_it(client):
    shared = prompt(160, 20)
    _, _, first = client.greedy(shared + prompt(80, 21), 2)
    holder = first.timing.prefill_worker
    time.sleep(1.0)  # the holder's cache events reach the index
    hits_before = client.metric("pdserve:prefix_cache_hit_tokens_total", pool="prefill")
    # suffixes longer than the local-prefill bound: the decode worker holds the prefix too, but not 80 more tokens
    placed = []
    for i in range(4):
        placed.append(client.greedy(shared + prompt(80, 22 + i), 2)[2].timing.prefill_worker)
        time.sleep(0.5)  # a heartbeat passes: the holder no longer reports the last prompt as queued
    assert placed == [holder] * 4
    hits = client.metric("pdserve:prefix_cache_hit_tokens_total", pool="prefill") - hits_before
    assert hits >= 4 * 160


def test_the_openai_client_streams_completions_and_chat(client, service):
    import openai

    api = openai.OpenAI(base_url=service.http_url + "/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    stream = api.completions.create(
        model=model, prompt=prompt(90, 30), max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == 90
    whole = api.completions.create(model=model, prompt=prompt(90, 30), max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True})  # fmt: skip
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "length"
    chat = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story about a dragon."}], max_tokens=6,
        temperature=0, stream=True,
    )  # fmt: skip
    pieces = list(chat)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(p.choices[0].delta.content or "" for p in pieces)


def test_bad_requests_get_clear_errors_and_leave_nothing_behind(client):
    cases = [
        (pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6]), sampling=pb.SamplingParams(max_tokens=4)), "prompt"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=5000)), "max_tokens"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.Generate(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        list(client.stub.Generate(pb.GenerateRequest(text="hi", model="other-model"), timeout=30))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model" in error.value.details()
    status, body = client.post("/v1/completions", {"prompt": "hi", "max_tokens": -1})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = client.post("/v1/completions", {"prompt": "hi", "model": "nope"})
    assert status == 404 and "unknown model" in body["error"]["message"]
    status, body = client.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and body["error"]["param"].startswith("messages")
    client.wait_idle(5)


def test_cancelling_a_grpc_stream_frees_the_kv_on_both_sides_within_a_second(client):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(200, 40)),
                                 sampling=pb.SamplingParams(max_tokens=600, ignore_eos=True))  # fmt: skip
    call = client.stub.Generate(request, timeout=120)
    next(call), next(call)
    wait_for(lambda: any(w.kv_used_fraction > 0 for w in client.status().workers if w.role == "decode"))
    call.cancel()
    assert client.wait_idle(3) <= 1.5  # 1 s, plus one heartbeat (0.2 s) for the figures to show it


def test_closing_an_http_stream_frees_the_kv_on_both_sides(client):
    connection = client.open_stream({"prompt": prompt(200, 41), "max_tokens": 600, "ignore_eos": True})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    connection.close()
    assert client.wait_idle(5) <= 3.0


def test_a_client_gone_before_its_whole_completion_frees_the_kv_on_both_sides(client):
    connection = client.open_stream({"prompt": prompt(200, 46), "max_tokens": 600, "ignore_eos": True}, stream=False)
    wait_for(lambda: any(w.kv_used_fraction > 0 for w in client.status().workers if w.role == "decode"))
    connection.close()
    assert client.wait_idle(5) <= 3.0


def test_a_full_service_refuses_more_at_once_with_429_and_resource_exhausted_and_serves_the_admitted(client):
    # Long enough that the first admitted are still streaming when the last get their first token.
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(20, 44)),
                                 sampling=pb.SamplingParams(max_tokens=360, ignore_eos=True))  # fmt: skip
    started = time.monotonic()
    calls = [client.stub.Generate(request, timeout=120) for _ in range(MAX_INFLIGHT)]
    for call in calls:
        next(call)  # every one is running

    def refused(api: str) -> float:
        begun = time.monotonic()
        if api == "grpc":
            with pytest.raises(grpc.RpcError) as error:
                list(client.stub.Generate(request, timeout=30))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            status, body = client.post("/v1/completions", {"prompt": prompt(20, 45), "max_tokens": 4})
            assert status == 429 and "in flight" in body["error"]["message"]
        return time.monotonic() - begun

    with ThreadPoolExecutor(16) as pool:
        waits = list(pool.map(refused, ["grpc", "http"] * 8))
    latencies = []
    for call in calls:
        assert list(call)[-1].finish_reason == "length"
        latencies.append(time.monotonic() - started)
    p99 = sorted(latencies)[int(0.99 * len(latencies))]
    print(f"\noverload: 16 refused in at most {max(waits):.2f} s; {MAX_INFLIGHT} admitted, e2e p99 {p99:.1f} s")
    # On 2 cores both engines bind a core each (no core left to reserve): the router shares them while 40 stream.
    assert max(waits) < 2.0 and p99 < 60.0
    client.wait_idle(10)
    assert client.greedy(prompt(20, 46), 2)[2].finish_reason == "length"  # room again once they are gone


def test_the_client_deadline_is_honoured_and_frees_the_request(client):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(100, 42)),
                                 sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True))  # fmt: skip
    with pytest.raises(grpc.RpcError) as error:
        list(client.stub.Generate(request, timeout=1.0))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.wait_idle(3)


def test_abort_stops_a_running_request_by_id(client):
    request = pb.GenerateRequest(request_id="abort-me", token_ids=pb.TokenIds(ids=prompt(100, 43)),
                                 sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True))  # fmt: skip
    call = client.stub.Generate(request, timeout=120)
    next(call)
    assert client.stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10).found
    assert list(call)[-1].finish_reason == "abort"
    assert not client.stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10).found
    client.wait_idle(3)


def test_a_request_without_an_id_learns_the_one_it_got_on_admission_and_can_be_aborted_by_it(client):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(100, 44)),
                                 sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True))  # fmt: skip
    call = client.stub.Generate(request, timeout=120)
    request_id = dict(call.initial_metadata())["x-request-id"]  # before any token
    assert client.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10).found
    replies = list(call)
    assert replies[-1].finish_reason == "abort" and replies[-1].request_id == request_id
    client.wait_idle(3)


def test_health_reflection_models_and_metrics_answer(client):
    health = health_pb2_grpc.HealthStub(client.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(answers).list_services_response.service}
    assert {"pdserve.v1.Generation", "vllm.grpc.engine.VllmEngine", "grpc.health.v1.Health"} <= names
    models = client.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert models[0].block_size == 32 and models[0].context_length == 1024
    status, body = client.get("/v1/models")
    card = json.loads(body)["data"][0]
    assert status == 200 and card["id"] == models[0].id and card["max_model_len"] == 1024 and card["vocab_size"] > 2
    status, body = client.get("/health")
    assert status == 200 and json.loads(body)["live_workers"] == {"prefill": 2, "decode": 1}
    text = client.get("/metrics")[1].decode()
    for name in ("pdserve:time_to_first_token_seconds", "pdserve:inter_token_latency_seconds",
                 "pdserve:e2e_request_latency_seconds", "pdserve:kv_cache_usage_perc", "pdserve:num_requests_running",
                 "pdserve:prefix_cache_hit_tokens_total", "pdserve:placement_decisions_total",
                 "pdserve:index_outages", "pdserve:kv_transfer_seconds_total"):  # fmt: skip
        assert name in text, name


def test_tokenize_gives_the_ids_generation_uses_and_detokenize_gives_the_text_back(client):
    text, chat = "Once upon a time", [{"role": "user", "content": "Once upon a time"}]
    status, tokens = client.post("/tokenize", {"prompt": text, "return_token_strs": True})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 1024
    assert client.post("/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": text})
    _, completion = client.post("/v1/completions", {"prompt": text, "max_tokens": 1})
    assert completion["usage"]["prompt_tokens"] == tokens["count"]
    assert completion["system_fingerprint"].startswith("fp_")  # the same for every response of this service
    status, chat_tokens = client.post("/tokenize", {"messages": chat})
    _, reply = client.post("/v1/chat/completions", {"messages": chat, "max_tokens": 1})
    assert status == 200 and reply["usage"]["prompt_tokens"] == chat_tokens["count"] > tokens["count"]
    assert reply["system_fingerprint"] == completion["system_fingerprint"]
    status, refused = client.post("/tokenize", {"prompt": text, "model": "another"})
    assert status == 404 and refused["error"]["param"] == "model"
    status, refused = client.post("/detokenize", {"tokens": [10**6]})
    assert status == 400 and refused["error"]["param"] == "tokens"
    status, versions = client.get("/version")
    assert status == 200 and json.loads(versions)["version"] and json.loads(versions)["vllm_version"]


def complete(client, prompt_ids: list[int], **fields) -> tuple[list[int], dict]:
    """A greedy completion of 8 tokens unless ``fields`` say otherwise: its token ids and its choice."""
    body = {"prompt": prompt_ids, "temperature": 0, "max_tokens": 8, "ignore_eos": True, **fields}
    status, reply = client.post("/v1/completions", body)
    assert status == 200, reply
    return reply["pdserve"]["token_ids"], reply["choices"][0]


def test_min_tokens_holds_off_a_stop_token_until_that_many_are_out(client):
    ids = prompt(24, 500)
    first = complete(client, ids)[0][0]
    stopped, choice = complete(client, ids, stop_token_ids=[first])
    assert len(stopped) == 1 and (choice["finish_reason"], choice["stop_reason"]) == ("stop", first)
    held, _ = complete(client, ids, stop_token_ids=[first], min_tokens=5)
    assert len(held) >= 5 and first not in held[:5]


def test_logit_bias_makes_a_token_the_greedy_choice(client):
    ids = prompt(24, 501)
    greedy, _ = complete(client, ids)
    favoured = next(token for token in range(10, 200) if token not in greedy)
    biased, _ = complete(client, ids, logit_bias={str(favoured): 100})
    assert biased == [favoured] * 8


def test_allowed_token_ids_bound_every_token(client):
    ids = prompt(24, 502)
    greedy, _ = complete(client, ids)
    allowed = [t for t in range(10, 200) if t not in greedy][:3]
    bounded, _ = complete(client, ids, allowed_token_ids=allowed)
    assert set(bounded) <= set(allowed)


def test_bad_words_never_appear_in_the_output(client):
    ids = prompt(24, 512)
    greedy, _ = complete(client, ids, max_tokens=8)
    for token in greedy:  # a token whose text tokenizes back to it alone: banning the word bans the token
        _, word = client.post("/detokenize", {"tokens": [token]})
        _, again = client.post("/tokenize", {"prompt": word["prompt"].strip(), "add_special_tokens": False})
        if word["prompt"].strip() and again["tokens"] == [token]:
            break
    else:
        pytest.fail(f"no output token of {greedy} is a word of its own")
    banned, _ = complete(client, ids, max_tokens=8, bad_words=[word["prompt"].strip()])
    assert token not in banned and banned != greedy


def test_a_stop_string_ends_the_text_and_is_kept_only_when_asked(client):
    ids = prompt(24, 503)
    _, whole = complete(client, ids, max_tokens=16)
    text = whole["text"]
    stop = text[len(text) // 2 :][:2]
    at = text.find(stop)
    _, cut = complete(client, ids, max_tokens=16, stop=[stop])
    _, kept = complete(client, ids, max_tokens=16, stop=[stop], include_stop_str_in_output=True)
    assert (cut["text"], cut["stop_reason"]) == (text[:at], stop)
    assert (kept["text"], kept["stop_reason"]) == (text[: at + len(stop)], stop)


def test_special_tokens_reach_the_text_only_when_not_skipped(client):
    _, eos = client.post("/tokenize", {"prompt": "</s>", "add_special_tokens": False})
    only_eos = dict(allowed_token_ids=eos["tokens"], max_tokens=3)
    tokens, skipped = complete(client, prompt(24, 504), **only_eos)
    _, shown = complete(client, prompt(24, 504), skip_special_tokens=False, **only_eos)
    assert tokens == eos["tokens"] * 3 and skipped["text"] == "" and shown["text"].count("</s>") == 3


def test_truncate_prompt_tokens_keeps_the_tail_of_the_prompt(client):
    ids = prompt(60, 505)
    status, truncated = client.post(
        "/v1/completions", {"prompt": ids, "temperature": 0, "max_tokens": 6, "truncate_prompt_tokens": 20}
    )
    assert status == 200 and truncated["usage"]["prompt_tokens"] == 20
    assert truncated["pdserve"]["token_ids"] == complete(client, ids[-20:], max_tokens=6, ignore_eos=False)[0]


def test_completion_logprobs_are_the_models_own_with_the_likeliest_alternatives(client, model_dir):
    ids = prompt(24, 506)
    tokens, choice = complete(client, ids, max_tokens=6, logprobs=3)
    logprobs, reference = choice["logprobs"], transformers_logprobs(model_dir, ids, tokens)
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
    for position, token in enumerate(tokens):
        expected = reference[position]
        assert logprobs["token_logprobs"][position] == pytest.approx(expected[token], abs=1e-3)
        likeliest = sorted(expected, reverse=True)[:3]
        assert sorted(logprobs["top_logprobs"][position].values(), reverse=True) == pytest.approx(likeliest, abs=1e-3)
    lengths = [len(token) for token in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(6)]
    _, plain = complete(client, ids, max_tokens=6)
    assert plain["logprobs"] is None


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(client, model_dir):
    ids = prompt(16, 513)
    _, plain = complete(client, ids, max_tokens=2)
    tokens, echoed = complete(client, ids, max_tokens=2, echo=True, logprobs=1, prompt_logprobs=2)
    logprobs, reference = echoed["logprobs"], transformers_logprobs(model_dir, ids[:1], ids[1:])
    assert len(logprobs["tokens"]) == 16 + 2 and logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:16] == pytest.approx([reference[i][ids[i + 1]] for i in range(15)], abs=1e-3)
    _, prompt_text = client.post("/detokenize", {"tokens": ids})
    assert echoed["text"] == prompt_text["prompt"] + plain["text"]
    second = echoed["prompt_logprobs"][1][str(ids[1])]
    assert echoed["prompt_logprobs"][0] is None and second["logprob"] == pytest.approx(reference[0][ids[1]], abs=1e-3)
    status, refused = client.post("/v1/completions", {"prompt": ids, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and refused["error"]["param"] == "prompt_logprobs"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 1}
    status, reply = client.post("/v1/chat/completions", chat)  # a chat's are the response's, as vLLM puts them
    _, rendered = client.post("/tokenize", {"messages": chat["messages"]})
    assert status == 200 and len(reply["prompt_logprobs"]) == rendered["count"] and reply["prompt_logprobs"][0] is None
    assert "prompt_logprobs" not in reply["choices"][0]


def test_grpc_takes_the_same_sampling_extensions_and_returns_logprobs_and_the_stop_reason(client):
    ids = prompt(24, 506)
    http_tokens, choice = complete(client, ids, max_tokens=6, logprobs=2)

    def generate(**sampling) -> list:
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(temperature=0, **sampling)
        )
        return list(client.stub.Generate(request, timeout=60))

    entries = [entry for reply in generate(max_tokens=6, ignore_eos=True, logprobs=2) for entry in reply.logprobs]
    assert [entry.token_id for entry in entries] == http_tokens and all(len(entry.top) == 2 for entry in entries)
    assert [entry.logprob for entry in entries] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-5)
    (stopped,) = generate(max_tokens=6, stop_token_ids=[http_tokens[0]])
    assert stopped.WhichOneof("stop_reason") == "stop_token_id" and stopped.stop_token_id == http_tokens[0]
    favoured = next(token for token in range(10, 200) if token not in http_tokens)
    biased = generate(max_tokens=4, ignore_eos=True, logit_bias={favoured: 100.0}, min_tokens=2)
    assert [t for reply in biased for t in reply.token_ids] == [favoured] * 4


def test_the_openai_client_gets_chat_logprobs_streamed_and_whole_alike(client, service):
    import openai

    api = openai.OpenAI(base_url=service.http_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Once upon a time"}]
    asked = dict(model=api.models.list().data[0].id, messages=messages, max_tokens=5, temperature=0,
                 logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    whole = api.chat.completions.create(**asked).choices[0].logprobs.content
    chunks = [chunk.choices[0] for chunk in api.chat.completions.create(stream=True, **asked) if chunk.choices]
    streamed = [entry for choice in chunks if choice.logprobs for entry in choice.logprobs.content]
    assert len(whole) == 5 and [e.token for e in streamed] == [e.token for e in whole]
    for entry, again in zip(whole, streamed, strict=True):
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 2 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(alternatives[0], abs=1e-4)  # greedy: the likeliest
        assert again.logprob == pytest.approx(entry.logprob, abs=1e-4) and bytes(entry.bytes) == entry.token.encode()


def test_usage_counts_prompt_tokens_found_in_a_prefix_cache_never_the_kv_moved_for_the_request(client):
    fresh = prompt(200, 600)
    _, _, first = client.greedy(fresh, 2)
    assert first.timing.placement == "disaggregated"
    assert first.usage.cached_prompt_tokens == 0 and first.usage.kv_transferred_tokens >= 160
    time.sleep(1.0)  # the cache events reach the index
    status, again = client.post("/v1/completions", {"prompt": fresh, "max_tokens": 2, "temperature": 0})
    assert status == 200 and again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192


def test_structured_outputs_constrain_what_the_decode_worker_samples(client):
    ids, free = prompt(24, 507), dict(max_tokens=12, ignore_eos=False)
    _, chosen = complete(client, ids, structured_outputs={"choice": ["alpha", "beta"]}, **free)
    assert chosen["text"] in ("alpha", "beta") and chosen["finish_reason"] == "stop"
    _, matched = complete(client, ids, structured_outputs={"regex": "[a-c]{3}"}, **free)
    assert re.fullmatch("[a-c]{3}", matched["text"])
    _, grammar = complete(client, ids, structured_outputs={"grammar": 'root ::= "{\\"n\\":" [1-3] "}"'}, **free)
    assert json.loads(grammar["text"]) in ({"n": 1}, {"n": 2}, {"n": 3})
    body = {"messages": [{"role": "user", "content": "yes or no"}], "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer",
                                                                       "schema": {"enum": ["yes", "no"]}}}}  # fmt: skip
    status, reply = client.post("/v1/chat/completions", body)
    assert status == 200 and json.loads(reply["choices"][0]["message"]["content"]) in ("yes", "no")
    status, refused = client.post("/v1/completions", {"prompt": ids, "structured_outputs": {"regex": "(["}})
    assert status == 400 and refused["error"]["param"] == "structured_outputs"


CITY = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}  # fmt: skip


def test_a_required_tool_call_has_json_arguments_streams_as_the_same_call_and_goes_back_as_history(service, model_dir):
    import openai

    api = openai.OpenAI(base_url=service.http_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # a random model pads JSON with whitespace, which structured outputs allow: steered off it
    ask = dict(model=api.models.list().data[0].id, messages=messages, tools=[CITY], tool_choice="required",
               parallel_tool_calls=False, temperature=0, max_tokens=60,
               logit_bias={str(t): b for t, b in whitespace_banned(model_dir).items()})  # fmt: skip
    whole = api.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    (call,) = whole.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id and call.type == "function"
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 10
    pieces, finish = {}, None
    for chunk in api.chat.completions.create(**ask, stream=True):
        for piece in chunk.choices[0].delta.tool_calls or ():
            joined = pieces.setdefault(piece.index, {"name": "", "arguments": ""})
            joined["name"] += piece.function.name or ""
            joined["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert pieces == {0: {"name": "get_weather", "arguments": call.function.arguments}} and finish == "tool_calls"
    history = [*messages, whole.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    follow_up = api.chat.completions.create(**{**ask, "messages": history, "tool_choice": "none", "max_tokens": 4})
    assert follow_up.choices[0].finish_reason == "length" and not follow_up.choices[0].message.tool_calls


def test_auto_tool_choice_reads_a_call_the_model_writes_in_its_format(client):
    written = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo"\}\}</tool_call>'
    loose = {**CITY, "function": {**CITY["function"], "strict": False}}
    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [loose], "temperature": 0,
            "max_tokens": 100, "structured_outputs": {"regex": written}}  # fmt: skip
    status, reply = client.post("/v1/chat/completions", body)
    choice = reply["choices"][0]
    assert status == 200 and choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_n_copies_of_a_prompt_share_one_prefill_and_decode_from_its_kv(client, reference):
    ids = prompt(400, 604)  # long enough to be prefilled on a prefill worker
    prefilled = client.metric("pdserve:prompt_tokens_total", pool="prefill")
    shared = client.metric("pdserve:placement_decisions_total", reason="shared_prompt")
    status, body = client.post("/v1/completions", {"prompt": ids, "n": 3, "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True})  # fmt: skip
    assert status == 200 and body["pdserve"]["choices_token_ids"] == [reference(ids, 6)] * 3
    assert client.metric("pdserve:prompt_tokens_total", pool="prefill") - prefilled == 400  # one prefill
    assert client.metric("pdserve:placement_decisions_total", reason="shared_prompt") - shared == 2
    assert body["usage"]["prompt_tokens"] == 400 and body["usage"]["completion_tokens"] == 18


def test_n_and_batches_of_prompts_answer_one_choice_per_sequence(client, service):
    import openai

    api = openai.OpenAI(base_url=service.http_url + "/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    sampled = api.completions.create(model=model, prompt=prompt(20, 508), n=3, max_tokens=8, temperature=1.0,
                                     seed=11, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len({c.text for c in sampled.choices}) >= 2
    assert sampled.usage.prompt_tokens == 20 and sampled.usage.completion_tokens == 24
    greedy = api.completions.create(model=model, prompt=prompt(20, 508), n=2, max_tokens=8, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    batch = [prompt(20, 509), prompt(24, 510), prompt(28, 511)]
    together = api.completions.create(model=model, prompt=batch, max_tokens=6, temperature=0)
    alone = [
        api.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0).choices[0].text for ids in batch
    ]
    assert [c.text for c in together.choices] == alone and together.usage.prompt_tokens == 72
    chunks = list(api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2,
                                              max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True}))  # fmt: skip
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)}  # fmt: skip
    assert texts[0] == texts[1] and chunks[-1].usage.completion_tokens == 8


def test_request_metrics_are_ray_metrics_too(client, service):
    client.greedy(prompt(60, 79), 2)
    url = f"http://127.0.0.1:{service.config.ray_metrics_export_port}/metrics"
    deadline = time.monotonic() + 60  # Ray's agent exports every few seconds
    while True:
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        if "ray_pdserve_time_to_first_token_seconds_bucket" in text and "ray_pdserve_requests" in text:
            break
        assert time.monotonic() < deadline, "pdserve's metrics never reached Ray's metrics export"
        time.sleep(1)


def test_kv_transfer_bytes_are_counted_per_backend(client):
    before = client.metric("pdserve:kv_transfer_bytes_total", backend="torch_dist")
    assert client.greedy(prompt(150, 77), 2)[2].timing.placement == "disaggregated"
    assert client.metric("pdserve:kv_transfer_bytes_total", backend="torch_dist") > before


def test_status_lists_the_pools_and_their_load(client):
    client.greedy(prompt(100, 78), 2)
    time.sleep(0.5)  # its cache events reach the index
    status = client.status()
    assert sorted(w.role for w in status.workers) == ["decode", "prefill", "prefill"]
    assert status.mode == "disaggregated" and status.policy == "prefix_aware" and status.index_available
    assert any(w.cached_blocks >= 3 for w in status.workers)


def test_a_running_stream_survives_other_clients_going_away(client, reference):
    ids = prompt(120, 50)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("tokens", client.greedy(ids, 40)[0]))
    worker.start()
    for i in range(3):
        other = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(100, 60 + i)),
                                   sampling=pb.SamplingParams(max_tokens=300))  # fmt: skip
        call = client.stub.Generate(other, timeout=60)
        next(call)
        call.cancel()
    worker.join(120)
    assert result["tokens"] == reference(ids, 40)


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_the_benchmark_load_generator_records_every_request(service, api):
    import asyncio

    from bench.load import LoadSpec, run_load, summarize
    from bench.workloads import WorkloadSpec, make_workload

    workload = make_workload(WorkloadSpec("multi-turn", requests=4, turns=2, input_tokens=60, output_tokens=6), 1000)
    load = LoadSpec(api, rate=20.0, progress=False)
    records, wall = asyncio.run(run_load(service.http_url, service.grpc_address, workload, load))
    assert [(r.error, r.output_tokens) for r in records] == [("", 6)] * 4
    assert all(r.ttft_s > 0 and r.e2e_s > r.ttft_s and r.itl_s for r in records)
    second_turns = [r for r in records if r.turn == 1]
    assert all(r.cached_tokens >= 32 for r in second_turns)  # the conversation's first turn is a cached prefix
    assert summarize(records, wall)["prefix_hit_rate"] > 0


@pytest.fixture(scope="module")
def vllm_stub(client):
    """A client built from smg-grpc-proto's stubs (vLLM's VllmEngine API), on pdserve's gRPC port."""
    from smg_grpc_proto import vllm_engine_pb2_grpc

    return vllm_engine_pb2_grpc.VllmEngineStub(client.raw_channel)


def test_vllms_grpc_generate_streams_the_token_ids_pdserves_own_generate_streams(client, vllm_stub):
    from smg_grpc_proto import vllm_engine_pb2 as vpb

    ids = prompt(150, 601)
    ours, _, _ = client.greedy(ids, 12)
    sampling = vpb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    ask = vpb.GenerateRequest(request_id="vllm-api-1", tokenized=vpb.TokenizedInput(input_ids=ids),
                              sampling_params=sampling, stream=True)  # fmt: skip
    replies = list(vllm_stub.Generate(ask, timeout=120))
    chunks = [r.chunk for r in replies if r.WhichOneof("response") == "chunk"]
    (complete,) = [r.complete for r in replies if r.WhichOneof("response") == "complete"]
    streamed = [t for c in chunks for t in c.token_ids]
    assert streamed == ours and complete.finish_reason == "length" and complete.prompt_tokens == 150
    logprobs = [lp for c in chunks for lp in c.output_logprobs.token_logprobs]
    assert len(logprobs) == 12 and all(lp <= 0 for lp in logprobs)
    assert all(len(top.token_ids) == 2 for c in chunks for top in c.output_logprobs.top_logprobs)
    once = vpb.GenerateRequest(request_id="vllm-api-2", tokenized=ask.tokenized, sampling_params=sampling)
    whole = list(vllm_stub.Generate(once, timeout=120))
    assert [r.WhichOneof("response") for r in whole] == ["complete"] and list(whole[0].complete.output_ids) == ours


def test_vllms_grpc_n_copies_come_back_indexed_and_abort_by_id_ends_them_all(client, vllm_stub):
    from smg_grpc_proto import vllm_engine_pb2 as vpb

    sampling = vpb.SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=900, ignore_eos=True)
    ask = vpb.GenerateRequest(request_id="vllm-api-abort", tokenized=vpb.TokenizedInput(input_ids=prompt(20, 602)),
                              sampling_params=sampling, stream=True)  # fmt: skip
    stream = vllm_stub.Generate(ask, timeout=120)
    seen = set()
    for reply in stream:
        seen.add(reply.chunk.index)
        if seen == {0, 1}:
            break
    vllm_stub.Abort(vpb.AbortRequest(request_ids=["vllm-api-abort"]), timeout=10)
    ends = [r.complete for r in stream if r.WhichOneof("response") == "complete"]
    assert sorted((c.index, c.finish_reason) for c in ends) == [(0, "abort"), (1, "abort")]


def test_vllms_grpc_describes_the_model_and_server_and_hands_out_the_tokenizer(service, vllm_stub, model_dir):
    import io
    import zipfile

    from smg_grpc_proto import vllm_engine_pb2 as vpb
    from smg_grpc_proto.generated import common_pb2
    from tokenizers import Tokenizer

    model = vllm_stub.GetModelInfo(vpb.GetModelInfoRequest(), timeout=10)
    assert model.is_generation and model.vocab_size == 1024 and model.architectures == ["LlamaForCausalLM"]
    assert model.served_model_name == service.config.engine.served_model_id and model.max_context_length > 0
    server = vllm_stub.GetServerInfo(vpb.GetServerInfoRequest(), timeout=10)
    assert server.server_type == "vllm-grpc" and server.kv_connector == "" and server.uptime_seconds > 0
    assert vllm_stub.HealthCheck(vpb.HealthCheckRequest(), timeout=10).healthy
    (load,) = vllm_stub.GetLoads(vpb.GetLoadsRequest(), timeout=10).loads
    assert load.dp_rank == 0 and 0 <= load.token_usage <= 1
    chunks = list(vllm_stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=10))
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(c.data for c in chunks)))
    tokenizer = Tokenizer.from_str(bundle.read("tokenizer.json").decode())
    assert (
        tokenizer.encode("naïve café").ids
        == Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("naïve café").ids
    )
    assert chunks[-1].sha256 and all(not c.sha256 for c in chunks[:-1])


@pytest.mark.parametrize("field,changes", [
    ("kv_transfer_params_json", {"kv_transfer_params_json": "{}"}),
    ("data_parallel_rank", {"data_parallel_rank": 1}),
    ("sampling_params.logprobs", {"sampling_params": {"logprobs": -1}}),
    ("top_p", {"sampling_params": {"top_p": 7.0}}),
])  # fmt: skip
def test_vllms_grpc_refuses_what_pdserve_cannot_honour_naming_the_field(vllm_stub, field, changes):
    from google.protobuf import json_format
    from smg_grpc_proto import vllm_engine_pb2 as vpb

    ask = json_format.ParseDict({"request_id": f"refused-{field}", "tokenized": {"input_ids": prompt(8, 603)},
                                 "sampling_params": {"max_tokens": 4}, **changes}, vpb.GenerateRequest())  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        list(vllm_stub.Generate(ask, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in refused.value.details()


def test_a_restarted_router_rebuilds_its_in_memory_index_from_the_workers(service, client):
    """Last in the module: it kills the router replica. The workers find the new one empty at their next
    heartbeat and re-send what they hold, so the prefix hits come back before the caches turn over."""
    from faults import kill_replica

    shared = prompt(160, 700)
    first = client.greedy(shared + prompt(80, 701), 2)[2]
    holder = first.timing.prefill_worker
    wait_for(lambda: held(client).get(holder, 0) >= 160 // 32, 10)
    before = held(client)
    killed_at = kill_replica(service, "Router", first.timing.router)

    def rebuilt() -> bool:
        try:
            now = held(client)
        except grpc.RpcError:  # no router yet
            return False
        return all(now.get(worker, 0) >= blocks for worker, blocks in before.items())

    wait_for(rebuilt, 120)
    print(f"\nrouter killed: index rebuilt {time.monotonic() - killed_at:.1f} s after, {held(client)} blocks held")
    for i in range(3):  # placed by what the rebuilt index holds: on the holder, its blocks a hit there
        last = client.greedy(shared + prompt(80, 702 + i), 2)[2]
        assert last.timing.prefill_worker == holder and last.usage.cached_prompt_tokens >= 160
        assert last.timing.router != first.timing.router  # served by the new replica


def held(client) -> dict[str, int]:
    """Blocks the router's index holds per worker."""
    return {w.worker_id: w.cached_blocks for w in client.status().workers if w.cached_blocks}
