"""scripts/serve.py end to end: a subprocess on a free loopback port serving tiny
checkpoints (the XLA executables come from the persistent cache the engine fixture
filled), the openai client, and SIGTERM draining an in-flight stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from moesd_jax.checkpoint import save_checkpoint
from moesd_jax.data import BUNDLED_TOKENIZER_DIR
from tests.serving.conftest import BUCKETS, MAX_LEN, MODEL, SLOTS, SPEC, rss_mb

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    target, draft = models
    return (save_checkpoint(d / "target", target, tokenizer_dir=BUNDLED_TOKENIZER_DIR),
            save_checkpoint(d / "draft", draft))


def _read_until_ready(proc, timeout):
    lines, box = [], {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line and "http://" in line and "url" not in box:
                box["url"] = line.split(" at ")[1].split()[0]
                box["t"] = time.monotonic()

    threading.Thread(target=reader, daemon=True).start()
    t0 = time.monotonic()
    while "url" not in box:
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("serve.py did not start:\n" + "".join(lines))
        time.sleep(0.05)
    return box["url"], box["t"] - t0, lines


def test_serve_script_sigterm_drains(checkpoints, engine, xla_cache_dir, prompts, reference):
    target_dir, draft_dir = checkpoints
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu",
               JAX_NUMPY_RANK_PROMOTION="raise", PYTHONPATH=str(REPO))
    n_cached = len(list(Path(xla_cache_dir).iterdir()))
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(target_dir),
           "--draft", str(draft_dir), "--spec", SPEC.method, "--k", str(SPEC.k),
           "--slots", str(SLOTS), "--max-len", str(MAX_LEN),
           "--prefill-buckets", ",".join(map(str, BUCKETS)), "--port", "0",
           "--served-model-name", MODEL, "--compile-cache", str(xla_cache_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    try:
        url, startup, lines = _read_until_ready(proc, timeout=150)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model=MODEL, prompt=prompts[3], max_tokens=10,
                                      temperature=0, extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == reference[3][:10]
        new = len(list(Path(xla_cache_dir).iterdir())) - n_cached
        print(f"serve.py ready in {startup:.1f} s ({new} new XLA cache entries), "
              f"RSS {rss_mb(proc.pid):.0f} MB")

        # a long stream in flight when SIGTERM arrives still completes
        got, first = {}, threading.Event()

        def stream():
            n, reason = 0, None
            for ch in client.completions.create(model=MODEL, prompt=prompts[0],
                                                max_tokens=90, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
                first.set()
                if ch.usage is not None:
                    n = ch.usage.completion_tokens
                for c in ch.choices:
                    reason = c.finish_reason or reason
            got.update(n=n, reason=reason)

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # new work is refused once the drain has begun
            r2 = httpx.post(url + "/completions", json={"prompt": "x", "max_tokens": 2},
                            timeout=10)
            assert r2.status_code == 503, r2.text
        except httpx.TransportError:
            pass
        t.join(120)
        assert got == {"n": 90, "reason": "length"}
        assert proc.wait(60) == 0
        assert any("server stopped" in x for x in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
