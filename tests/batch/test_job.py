"""Batch jobs (moesd-batch-decode) on a tiny checkpoint pair: resume after SIGKILL at
several points (one of them mid-write) equals an uninterrupted run, bad lines are
rejected with their line numbers, and a two-process jax.distributed run under the ``dp``
mesh writes the same results as one process.

The job runs as a subprocess (the kills are real SIGKILLs, injected by the test-only
``MOESD_BATCH_TEST_KILL`` hook of ``moesd_jax/batch/outputs.py``); the uninterrupted
reference runs in this process. All share the session's persistent XLA cache, so only
the first run compiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moesd_jax.batch import inputs
from moesd_jax.batch.outputs import ResultWriter, merge_parts, part_path
from moesd_jax.checkpoint import save_checkpoint
from moesd_jax.cli import batch_decode
from tests.helpers import build, moe_cfg, perturbed_copy

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_TOKENIZER = ROOT / "moesd_jax" / "bundled" / "tokenizer"
BATCH = 4


def _lines() -> list[str]:
    """12 valid requests (greedy, seeded and unseeded sampling, text with stop strings)
    and 6 bad lines."""
    good = []
    for i in range(12):
        req = {"id": f"r{i:02d}", "prompt_ids": [(7 * i + j) % 4000 + 1 for j in range(3 + i)],
               "max_tokens": 4 + i % 5}
        if i % 3 == 1:
            req.update(temperature=1.0, seed=100 + i)  # seeded sampling
        if i % 3 == 2:
            req.update(temperature=0.9, top_k=50)  # seed from --seed and the id
        good.append(json.dumps(req))
    good[5] = json.dumps({"id": 5, "prompt_ids": [9, 8, 7], "max_tokens": 8,
                          "temperature": 0.7, "top_p": 0.9})
    bad = ['{"id": "x1", "prompt_ids": [1, 2]',                            # not JSON
           json.dumps({"prompt_ids": [1, 2]}),                              # no id
           json.dumps({"id": "r03", "prompt_ids": [5]}),                    # duplicate id
           json.dumps({"id": "x2", "prompt_ids": [5], "temp": 1.0}),        # unknown field
           json.dumps({"id": "x3", "prompt_ids": [5] * 40, "max_tokens": 30}),  # too long
           json.dumps({"id": "x4"}),                                        # no prompt
           json.dumps({"id": "x5", "prompt": "text"})]                      # no tokenizer
    lines = good[:4] + bad[:2] + good[4:8] + [""] + bad[2:] + good[8:]
    return lines


BAD_LINES = {5: "not valid JSON", 6: "missing field 'id'", 12: "duplicate id 'r03'",
             13: "unknown field 'temp'", 14: "prompt too long", 15: "exactly one of",
             16: "needs a tokenizer"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    cfg = moe_cfg(vocab=4096, d=32, layers=1, experts=8, top_k=2, max_len=64,
                  eos_token_ids=(0,))
    target = build(cfg, seed=0)
    # no tokenizer: token-id prompts only (text prompts and stop strings: test below)
    save_checkpoint(d / "target", target)
    save_checkpoint(d / "draft", perturbed_copy(target, 0.3))
    (d / "in.jsonl").write_text("\n".join(_lines()) + "\n")
    return d


def _args(d: Path, out: Path) -> list[str]:
    return ["--input", str(d / "in.jsonl"), "--output", str(out), "--model", str(d / "target"),
            "--draft", str(d / "draft"), "--k", "2", "--batch-size", str(BATCH),
            "--seed", "11", "--no-progress"]


def _read(path: Path) -> dict:
    lines = path.read_text().splitlines()
    objs = [json.loads(x) for x in lines]
    ids = [o["id"] for o in objs]
    assert len(ids) == len(set(map(json.dumps, ids))), "duplicate ids in the output"
    return {json.dumps(o["id"]): o for o in objs}


@pytest.fixture(scope="module")
def reference(job):
    """The uninterrupted run (in this process)."""
    out = job / "ref" / "out.jsonl"
    assert batch_decode.main(_args(job, out)) == 1  # rejects -> exit status 1
    rejects = [json.loads(x) for x in (job / "ref" / "out.rejects.jsonl").read_text()
               .splitlines()]
    return _read(out), rejects


def _env(**extra) -> dict:
    env = dict(os.environ)  # tests/conftest.py: 8 CPU devices, the session's XLA cache
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MOESD_BATCH_TEST_KILL", None)
    env.update(extra)
    return env


def _run(args: list[str], kill: str | None = None) -> subprocess.CompletedProcess:
    env = _env(**({"MOESD_BATCH_TEST_KILL": kill} if kill else {}))
    return subprocess.run([sys.executable, "-m", "moesd_jax.cli.batch_decode", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_rejects_name_line_and_field(reference):
    results, rejects = reference
    assert sorted(results) == sorted(json.dumps(f"r{i:02d}") if i != 5 else "5"
                                     for i in range(12))
    assert {r["line"]: r["error"] for r in rejects}.keys() == BAD_LINES.keys()
    for r in rejects:
        assert BAD_LINES[r["line"]] in r["error"], r
    too_long = next(r for r in rejects if r["line"] == 14)
    assert "max_len=64" in too_long["error"] and too_long["id"] == "x3"
    assert all(len(o["token_ids"]) <= 4 + int(k.strip('"r')) % 5 and o["text"] is None
               for k, o in results.items() if k != "5")
    assert set(results["5"]["stats"]) == {"iterations", "drafted", "accepted", "draft_fed",
                                          "accepted_per_position", "mean_acceptance_length"}


def test_text_prompts_and_stop_strings():
    """With a tokenizer: ``prompt`` text is encoded as the server does, the output text is
    cut before the first stop string and the tokens after the one that completes it."""
    from moesd_jax.batch.job import result_line
    from moesd_jax.data import load_tokenizer

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    limits = inputs.Limits(vocab=4096, max_len=128, k_eff=2)
    req = inputs.parse_line({"id": "t", "prompt": "def f(x):", "stop": ["return", "zzz"]}, 1,
                            inputs.Defaults(), limits, tok)
    assert list(req.prompt_ids) == tok.encode("def f(x):", add_special_tokens=False)
    ids = tok.encode("\n    y = x\n    return y\n", add_special_tokens=False)
    out = result_line(req, ids, {}, tok, eos=(0,))
    assert out["text"] == "\n    y = x\n    " and out["finish_reason"] == "stop"
    assert "return" in tok.decode(out["token_ids"]) and len(out["token_ids"]) < len(ids)
    assert "return" not in tok.decode(out["token_ids"][:-1])
    plain = result_line(dataclasses.replace(req, stops=()), ids, {}, tok, eos=(0,))
    assert plain["token_ids"] == ids and plain["finish_reason"] == "length"
    with pytest.raises(inputs.LineError, match=r"stop=\[''\] must be a non-empty string"):
        inputs.parse_line({"id": "t", "prompt": "x", "stop": [""]}, 1, inputs.Defaults(),
                          limits, tok)


def test_resume_after_sigkill_equals_uninterrupted_run(job, reference):
    want, want_rejects = reference
    out = job / "killed" / "out.jsonl"
    args = _args(job, out)
    # 1: killed in the middle of writing the 3rd line: a torn last line
    p = _run(args, kill="torn:2")
    assert p.returncode == -9, p.stderr[-2000:]
    text = out.read_text()
    assert text.count("\n") == 2 and not text.endswith("\n")
    # 2: restarted (drops the torn line), killed in the middle of a batch
    p = _run(args, kill="lines:3")
    assert p.returncode == -9, p.stderr[-2000:]
    assert "dropped a partial last line" in p.stderr
    assert out.read_text().count("\n") == 5 and out.read_text().endswith("\n")
    # 3: runs to the end: every valid id exactly once, equal to the uninterrupted run
    p = _run(args)
    assert p.returncode == 1, p.stderr[-2000:]  # rejects -> 1
    assert "Traceback" not in p.stderr and "line 13: unknown field 'temp'" in p.stderr
    got = _read(out)
    assert got == want  # greedy and sampled (seeded and job-seeded) rows alike
    rejects = [json.loads(x) for x in (job / "killed" / "out.rejects.jsonl").read_text()
               .splitlines()]
    assert rejects == want_rejects
    # 4: a finished job run again writes nothing
    assert batch_decode.main(args) == 1
    assert _read(out) == want


@pytest.mark.slow
def test_resume_at_more_kill_points(job, reference):
    """Killed before anything is written, at the first line, mid-write of a later line
    and at a batch boundary: still the uninterrupted run's output."""
    want, _ = reference
    out = job / "killed-more" / "out.jsonl"
    args = _args(job, out)
    for kill, lines_after in (("lines:0", 0), ("torn:0", 0), ("torn:5", 5), ("lines:4", 9)):
        p = _run(args, kill=kill)
        assert p.returncode == -9, p.stderr[-2000:]
        assert out.read_text().count("\n") == lines_after, kill
    p = _run(args)
    assert p.returncode == 1, p.stderr[-2000:]
    assert _read(out) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh", [
    "dp",  # collective: every batch runs across both processes, dp over all 8 devices
    pytest.param(None, marks=pytest.mark.slow)])  # each process decodes its share alone
def test_two_process_job_equals_one_process(job, reference, mesh):
    """jax.distributed over localhost, 4 CPU devices per process: each process decodes
    its share and writes its part; process 0 merges them into the output."""
    want, want_rejects = reference
    out = job / f"mp-{mesh}" / "out.jsonl"
    port = _free_port()
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8",
                                            "--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "moesd_jax.cli.batch_decode", *_args(job, out),
         *(["--mesh", mesh] if mesh else [])],
        env=_env(XLA_FLAGS=flags, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("two-process batch job timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 1, log[-3000:]  # both know there were rejects
    parts = [_read(part_path(out, i, 2)) for i in range(2)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])  # a real split
    assert _read(out) == want
    rejects = [json.loads(x) for x in (out.parent / "out.rejects.jsonl").read_text()
               .splitlines()]
    assert rejects == want_rejects
    # the merge step alone (hosts without a shared filesystem) gives the same file
    out.unlink()
    assert batch_decode.main(["--merge", "--output", str(out)]) == 0
    assert _read(out) == want


def test_split_seed_rule_writer_and_merge_errors(tmp_path):
    # the split: both copies of an id go to one process; unreadable lines by number
    keys = [inputs.id_key(x) for x in ("a", "b", 7, "7")]
    assert {inputs.owner(k, 1, 3) for k in keys} <= {0, 1, 2}
    assert inputs.owner(None, 5, 2) == 0 and inputs.owner(None, 6, 2) == 1
    assert inputs.default_seed(11, keys[0]) == inputs.default_seed(11, keys[0])
    assert inputs.default_seed(11, keys[0]) != inputs.default_seed(12, keys[0])
    assert inputs.default_seed(11, keys[2]) != inputs.default_seed(11, keys[3])
    # a result file that is not this job's, a second writer, a missing part
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot a result\n')
    with pytest.raises(Exception, match="line 2 is not a result line"):
        ResultWriter(bad)
    ok = tmp_path / "ok.jsonl"
    w = ResultWriter(ok)
    with pytest.raises(Exception, match="locked by another running job"):
        ResultWriter(ok)
    w.close()
    part_path(tmp_path / "m.jsonl", 0, 2).write_text('{"id": 1}\n')
    with pytest.raises(Exception, match="1 of 2 parts present"):
        merge_parts(tmp_path / "m.jsonl")
    assert batch_decode.main(["--merge", "--output", str(tmp_path / "m.jsonl")]) == 2
    assert batch_decode.main(["--output", str(tmp_path / "o.jsonl"), "--input",
                              str(tmp_path / "nope.jsonl")]) == 2
