"""moesd-generate (scripts/generate.py) --json on a converted HF model and on an HF
directory directly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moesd_jax.cli import generate
from tests.models.test_hf_parity import make_hf_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "mixtral"
    make_hf_model("mixtral", d)
    return d


def _run(argv, capsys):
    rc = generate.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json_on_hf_dir_and_converted(hf_dir, tmp_path, capsys):
    args = ["--prompt-ids", "1,2,3,4,5", "--prompt-ids", "7,8", "--max-new-tokens", "6",
            "--json"]
    rc, out, err = _run(["--model", str(hf_dir), "--spec", "none", *args], capsys)
    assert rc == 0, err
    direct = [json.loads(line) for line in out.splitlines()]
    assert len(direct) == 2 and all(len(r["token_ids"]) == 6 for r in direct)
    assert set(direct[0]["stats"]) >= {"iterations", "drafted", "accepted",
                                       "accepted_per_position", "mean_acceptance_length"}
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf.py"), "--hf-dir",
                    str(hf_dir), "--out", str(ckpt)], check=True, capture_output=True)
    trace = tmp_path / "trace.npz"  # the same run, its routing recorded
    rc, out, err = _run(["--model", str(ckpt), "--spec", "ngram", "--k", "3", *args,
                         "--routing-trace", str(trace)], capsys)
    assert rc == 0, err
    conv = [json.loads(line) for line in out.splitlines()]
    from moesd_jax.analysis.routing import load_traces

    traces, n_exp, top_k = load_traces(trace)
    assert [t.shape[:2] for t in traces] == [(r["stats"]["iterations"], 4) for r in conv]
    assert all(((t >= 0) & (t < n_exp)).all() for t in traces) and top_k == traces[0].shape[3]
    # greedy: speculation and conversion change nothing
    assert [r["token_ids"] for r in conv] == [r["token_ids"] for r in direct]
    assert conv[0]["stats"]["drafted"] == 3 * conv[0]["stats"]["iterations"]
    # the HF dir as a draft for itself: every draft accepted
    rc, out, err = _run(["--model", str(hf_dir), "--draft", str(hf_dir), "--k", "2", *args],
                        capsys)
    assert rc == 0, err
    same = [json.loads(line) for line in out.splitlines()]
    assert [r["token_ids"] for r in same] == [r["token_ids"] for r in direct]
    assert same[1]["stats"]["accepted"] == same[1]["stats"]["drafted"]


def test_generate_bad_input_is_a_clear_error(hf_dir, capsys):
    rc, out, err = _run(["--model", str(hf_dir), "--spec", "none", "--prompt-ids", "1,500"],
                        capsys)
    assert rc == 2 and "token id 500" in err and "Traceback" not in err
    rc, out, err = _run(["--model", str(hf_dir / "nope"), "--prompt-ids", "1"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, out, err = _run(["--model", str(hf_dir), "--spec", "none"], capsys)
    assert rc == 2 and "--prompt" in err
