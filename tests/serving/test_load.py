"""Bounded loopback load test: concurrent clients, 10% malformed requests, two identical
rounds; valid requests complete correctly, bad ones get a clear 4xx, the server stays up
and its memory does not grow over the second round."""

from __future__ import annotations

import asyncio
import gc
import json

import httpx
import pytest

from tests.serving.conftest import MODEL, rss_mb

# (raw body, expected status, a phrase the error message must contain)
MALFORMED = [
    (b'{"prompt": "def f(", "max_tokens": 4,', 400, "not valid JSON"),
    (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": [7] * 500, "max_tokens": 4}).encode(), 400, "max_len=128"),
    (json.dumps({"prompt": {"a": 1}, "max_tokens": "many"}).encode(), 400, "max_tokens"),
    ('{"prompt": "caf\u00e9", "max_tokens": 4}'.encode("latin-1"), 400, "not valid UTF-8"),
    (json.dumps({"prompt": "x", "temperature": [1]}).encode(), 400, "temperature"),
]


def _plan(n: int, n_prompts: int) -> list[tuple]:
    """Deterministic request mix: every 10th request is malformed."""
    out = []
    for j in range(n):
        if j % 10 == 9:
            out.append(("bad",) + MALFORMED[(j // 10) % len(MALFORMED)])
        else:
            i = (j * 7) % n_prompts
            out.append(("ok", i, 1 + j % 6, j % 3 == 0))
    return out


async def _one(client: httpx.AsyncClient, url: str, job, prompts):
    if job[0] == "bad":
        r = await client.post(url, content=job[1], headers={"content-type": "application/json"})
        return r.status_code, r.json(), None
    _, i, m, stream = job
    body = {"model": MODEL, "prompt": prompts[i], "max_tokens": m, "temperature": 0,
            "return_token_ids": True, "stream": stream}
    if not stream:
        r = await client.post(url, json=body)
        return r.status_code, r.json(), None
    text, ids, done = [], None, False
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                c = json.loads(line[6:])["choices"][0]
                text.append(c["text"])
                if c["finish_reason"]:
                    ids = c["token_ids"]
    return r.status_code, {"choices": [{"text": "".join(text), "token_ids": ids}]}, done


async def _round(base: str, plan, prompts, concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def go(job):
            async with sem:
                return await _one(client, base + "/completions", job, prompts)

        return await asyncio.gather(*(go(j) for j in plan))


def _check(plan, results, reference, tokenizer):
    for job, (status, body, done) in zip(plan, results):
        if job[0] == "bad":
            _, _, want_status, needle = job
            assert status == want_status, (job, body)
            assert needle in body["error"]["message"], (job, body)
        else:
            _, i, m, stream = job
            assert status == 200, (job, body)
            c = body["choices"][0]
            assert c["token_ids"] == reference[i][:m], job
            assert c["text"] == tokenizer.decode(c["token_ids"], skip_special_tokens=True)
            if stream:
                assert done, "stream did not end with data: [DONE]"


def _run_load(server, engine, prompts, reference, tokenizer, n, concurrency):
    plan = _plan(n, len(prompts))
    rss = []
    for _ in range(2):
        results = asyncio.run(_round(server.url, plan, prompts, concurrency))
        _check(plan, results, reference, tokenizer)
        gc.collect()
        rss.append(rss_mb())
    health = httpx.get(server.url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert engine.num_running == 0 and engine.num_waiting == 0
    growth = rss[1] - rss[0]
    print(f"load {n}x2 requests, {concurrency} clients: RSS {rss[0]:.0f} -> {rss[1]:.0f} MB")
    assert growth < 32, f"RSS grew {growth:.1f} MB over the second identical round"


def test_load_small(server, engine, prompts, reference, tokenizer):
    _run_load(server, engine, prompts, reference, tokenizer, n=60, concurrency=16)


@pytest.mark.slow
def test_load_full(server, engine, prompts, reference, tokenizer):
    _run_load(server, engine, prompts, reference, tokenizer, n=200, concurrency=32)
