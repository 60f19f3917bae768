"""A real two-process run: jax.distributed over localhost, 4 CPU devices per process,
greedy speculative decoding with the ``ep`` strategy over all 8 devices (and, slow,
``fsdp_ep`` with rows split across the processes) must produce the single-process
tokens."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sharding_worker import reference_tokens

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path: Path, strategy: str, nproc: int = 2):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    outs = [tmp_path / f"out{i}.json" for i in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(nproc), str(port),
                               strategy, str(outs[i])], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(nproc)]
    return procs, outs


def _wait(procs, timeout: float = 420):
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("two-process run timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


@pytest.mark.parametrize("strategy,mesh", [
    # slow: the default run keeps a two-process decode in
    # tests/batch/test_job.py::test_two_process_job_equals_one_process[dp]
    pytest.param("ep", {"expert": 8}, marks=pytest.mark.slow),
    # rows split over the two processes (data=2), gathered back to both
    pytest.param("fsdp_ep", {"data": 2, "expert": 4}, marks=pytest.mark.slow),
])
def test_two_process_sd_matches_single_process(tmp_path, strategy, mesh):
    # start the workers first: the single-process reference compiles meanwhile
    procs, outs = _run_workers(tmp_path, strategy)
    try:
        want = reference_tokens(8)
    finally:
        _wait(procs)
    results = [json.loads(o.read_text()) for o in outs]
    for i, r in enumerate(results):
        assert r["process_index"] == i and r["process_count"] == 2
        assert r["devices"] == 8 and r["local_devices"] == 4
        assert r["mesh"] == mesh
        assert r["primary"] == (i == 0)
        assert r["tokens"] == want, i


def test_single_process_helpers(monkeypatch):
    import jax.numpy as jnp
    import numpy as np

    from moesd_jax import distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize_distributed() is False  # no coordinator: one process
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.initialize_distributed() is False
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed.initialize_distributed("localhost:1", 2, 2)
    assert distributed.is_primary() and distributed.process_count() == 1
    out = distributed.process_allgather({"a": jnp.arange(3), "b": 4})
    assert isinstance(out["a"], np.ndarray) and out["a"].tolist() == [0, 1, 2]
    distributed.sync()
    assert distributed.broadcast_from_primary(7) == 7
