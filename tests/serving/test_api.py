"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moesd_jax.serving.api import ServerThread, create_app
from tests.serving.conftest import MAX_LEN, MODEL, REF_MAX, SLOTS, SPEC


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    yield c
    c.close()


def _complete(client, prompt, max_tokens, stream=False, **kw):
    """(token_ids, text, finish_reason, usage) of one completion."""
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    if not stream:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                      extra_body=extra, **kw)
        c = r.choices[0]
        return c.model_extra["token_ids"], c.text, c.finish_reason, r.usage
    text, ids, reason, usage = [], None, None, None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body=extra, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text)
            if c.finish_reason is not None:
                reason, ids = c.finish_reason, (c.model_extra or {}).get("token_ids")
    return ids, "".join(text), reason, usage


def test_models_and_health(server):
    r = httpx.get(server.url + "/models")
    assert r.status_code == 200
    m = r.json()["data"][0]
    assert m["id"] == MODEL and m["max_model_len"] == MAX_LEN
    assert m["spec_decode"] == {"method": "draft", "k": SPEC.k, "tree": None}
    h = httpx.get(server.url.removesuffix("/v1") + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_greedy_completion_equals_decoder(client, prompts, reference, tokenizer):
    for i in (0, 4, 9):
        m = 6 + i
        ids, text, reason, usage = _complete(client, prompts[i], m, temperature=0)
        assert ids == reference[i][:m]
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert reason == "length"
        assert usage.prompt_tokens == len(prompts[i]) and usage.completion_tokens == m
        assert usage.total_tokens == len(prompts[i]) + m
        sd = usage.model_extra["spec_decode"]
        assert sd["draft_tokens"] == SPEC.k * sd["drafts"]
        assert sum(sd["accepted_tokens_per_position"]) == sd["accepted_tokens"]
        assert sd["mean_acceptance_length"] == pytest.approx(
            1 + sd["accepted_tokens"] / max(sd["drafts"], 1))


def test_text_prompt_streaming_equals_non_streaming(client, prompts, reference, tokenizer):
    from tests.serving.conftest import TEXTS

    i = len(prompts) - len(TEXTS)
    want = tokenizer.decode(reference[i][:REF_MAX], skip_special_tokens=True)
    ids_a, text_a, reason_a, usage_a = _complete(client, TEXTS[0], REF_MAX, temperature=0)
    ids_b, text_b, reason_b, usage_b = _complete(client, TEXTS[0], REF_MAX, stream=True,
                                                 temperature=0)
    assert ids_a == ids_b == reference[i]
    assert text_a == text_b == want
    assert reason_a == reason_b == "length"
    assert usage_a.model_dump() == usage_b.model_dump()


def test_sixteen_concurrent_mixed_requests(client, prompts, reference):
    """16 concurrent requests (4 slots: continuous batching with admission as rows
    finish), mixed prompt lengths (both buckets) and max_tokens, half streamed: each
    equals SpecDecoder.generate of its prompt alone in a batch of 16."""
    jobs = [(i, 3 + (5 * i) % (REF_MAX - 2), i % 2 == 1) for i in range(len(prompts))]
    with ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(_complete, client, prompts[i], m, s, temperature=0)
                for i, m, s in jobs]
        outs = [f.result() for f in futs]
    for (i, m, _), (ids, _, reason, usage) in zip(jobs, outs):
        assert ids == reference[i][:m], i
        assert reason == "length" and usage.completion_tokens == m


def test_sampling_equals_decoder_with_same_seed(client, prompts, sampled_reference):
    """Sampling is per row (own seed/key): the server reproduces SpecDecoder's samples."""
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: _complete(
            client, prompts[i], REF_MAX, temperature=0.9, top_p=0.95, seed=100 + i,
            extra_body={"top_k": 40}), range(4)))
    for i, (ids, *_rest) in enumerate(outs):
        want = sampled_reference[i]
        assert ids == want, i


def test_stop_strings(client, prompts, reference, tokenizer):
    from tests.serving.conftest import TEXTS

    i = len(prompts) - len(TEXTS)
    full = tokenizer.decode(reference[i], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    for stream in (False, True):
        _, text, reason, usage = _complete(client, TEXTS[0], REF_MAX, stream=stream,
                                           temperature=0, stop=[stop, "\x00never"])
        assert text == full[:cut] and reason == "stop", (stream, stop)
        assert usage.completion_tokens <= REF_MAX


def test_chat_needs_a_template(client, server, engine, tokenizer):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL,
                                       messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in str(e.value)
    # the same engine behind a tokenizer with a template: chat works, streamed or not
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}# {{ m.role }}: {{ m.content }}\n"
                         "{% endfor %}{% if add_generation_prompt %}# assistant:{% endif %}")
    st = ServerThread(create_app(engine, tok, MODEL)).start()
    try:
        c = openai.OpenAI(base_url=st.url, api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "print hello"}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                      temperature=0)
        plain = c.completions.create(model=MODEL, prompt="# user: print hello\n# assistant:",
                                     max_tokens=8, temperature=0)
        assert r.choices[0].message.content == plain.choices[0].text
        assert r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens == 8
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True)
            if ch.choices]
        assert "".join(parts) == plain.choices[0].text
    finally:
        st.stop()


BAD = [
    (b"{not json", "not valid JSON"),
    (b'{"prompt": "\xff\xfe abc", "max_tokens": 4}', "not valid UTF-8"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "7"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 4, "temperature": "hot"}).encode(),
     "temperature"),
    (json.dumps({"prompt": 12, "max_tokens": 4}).encode(), "prompt"),
    (json.dumps({"max_tokens": 4}).encode(), "prompt: field required"),
    (json.dumps({"prompt": [1, "a"], "max_tokens": 4}).encode(), "prompt"),
    (json.dumps({"prompt": [1, 99999], "max_tokens": 4}).encode(), "outside [0, 4096)"),
    (json.dumps({"prompt": "x", "max_tokens": 4, "n": 2}).encode(), "n=2"),
    (json.dumps({"prompt": "x", "max_tokens": 4, "logprobs": 1}).encode(),
     "logprobs is not supported"),
    (json.dumps({"prompt": "x", "max_tokens": 4, "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "max_tokens": 200}).encode(), "max_len=128"),
    (json.dumps({"prompt": [5] * 125, "max_tokens": 4}).encode(), "max_len=128"),
    (json.dumps({"prompt": ["a", "b"], "max_tokens": 4}).encode(), "one prompt"),
    (json.dumps({"prompt": "x", "stop": [1]}).encode(), "stop"),
]


@pytest.mark.parametrize("body,needle", BAD)
def test_bad_requests_get_400_naming_the_problem(server, body, needle):
    r = httpx.post(server.url + "/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_unknown_model_and_route(server):
    r = httpx.post(server.url + "/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_is_429(server, engine):
    saved = engine.max_queue
    engine.max_queue = 0
    try:
        r = httpx.post(server.url + "/completions", json={"prompt": "x", "max_tokens": 2})
    finally:
        engine.max_queue = saved
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]


def _wait(pred, timeout=30.0):
    t = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < t, "timed out"
        time.sleep(0.02)


def test_client_disconnect_frees_the_slot(server, engine, prompts):
    aborted = engine.counters.finished["abort"]
    body = {"prompt": prompts[0], "max_tokens": MAX_LEN - 8, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/completions",
                                                 json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first token: hang up mid-generation
    _wait(lambda: engine.counters.finished["abort"] == aborted + 1)
    _wait(lambda: engine.num_running == 0)
    # non-streaming: the client hangs up once its request runs in a slot
    host, port = server.url.removeprefix("http://").removesuffix("/v1").split(":")
    payload = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        _wait(lambda: engine.num_running == 1)
    _wait(lambda: engine.counters.finished["abort"] == aborted + 2)
    _wait(lambda: engine.num_running == 0)


def _scrape(server) -> dict:
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items())
                                   if k != "model_name")
            out[key] = s.value
    return out


def test_metrics_parse_and_agree_with_usage(server, client, engine, prompts):
    _wait(lambda: engine.num_running == 0 and engine.num_waiting == 0)
    before = _scrape(server)
    usages = []
    lock = threading.Lock()

    def run(i):
        *_, usage = _complete(client, prompts[i], 5 + i, stream=i % 2 == 0, temperature=0)
        with lock:
            usages.append(usage)

    with ThreadPoolExecutor(6) as ex:
        list(ex.map(run, range(6)))
    after = _scrape(server)
    d = lambda name: after.get(name, 0) - before.get(name, 0)
    sd = [u.model_extra["spec_decode"] for u in usages]
    assert d("moesd:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert d("moesd:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert d("moesd:spec_decode_num_drafts_total") == sum(s["drafts"] for s in sd)
    assert d("moesd:spec_decode_num_draft_tokens_total") == sum(s["draft_tokens"] for s in sd)
    acc = sum(s["accepted_tokens"] for s in sd)
    assert d("moesd:spec_decode_num_accepted_tokens_total") == acc
    per_pos = [d(f"moesd:spec_decode_num_accepted_tokens_per_pos_total|position={j}")
               for j in range(SPEC.k)]
    assert per_pos == [sum(s["accepted_tokens_per_position"][j] for s in sd)
                       for j in range(SPEC.k)]
    assert sum(per_pos) == acc
    assert d("moesd:request_success_total|finished_reason=length") == 6
    assert after["moesd:num_requests_running"] == 0
    assert after["moesd:num_requests_waiting"] == 0
    assert after["moesd:num_slots"] == SLOTS
    assert after["moesd:generation_tokens_per_second"] >= 0
    steps = d("moesd:spec_decode_unique_experts_per_step_count")
    assert steps == d("moesd:verify_steps_total") > 0
    mean_unique = d("moesd:spec_decode_unique_experts_per_step_sum") / steps
    assert 1 <= mean_unique <= 8  # 8 experts per layer
