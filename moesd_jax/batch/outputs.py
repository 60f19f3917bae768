"""Output files of a batch job: a resumable JSONL writer, per-process parts and the merge.

Resume guarantee: every result line is written whole with ``os.write`` (the kernel holds
it once the call returns, so SIGKILL cannot lose it) and ``fsync``-ed after each batch. At
start the writer drops a trailing partial line (a kill in the middle of a write) and
collects the ids already written; the job skips those. So a job killed at any point and
restarted with the same arguments ends with every valid input id exactly once and no torn
line. A lock (``flock``) on the output refuses a second job writing the same file.

Files (``OUTPUT`` = ``--output``):

- one process: ``OUTPUT`` and the rejects file (``OUTPUT`` with ``.rejects.jsonl`` in
  place of its suffix, or ``--rejects``);
- P processes: each writes ``OUTPUT.part-PPPPP-of-NNNNN`` (and its rejects part); when
  all finished, process 0 merges the parts into ``OUTPUT`` (and the rejects) if it sees
  them all (a shared filesystem), else ``--merge`` does it once the parts are copied
  together. The parts stay; the merge can be rerun and replaces ``OUTPUT`` atomically.

Test-only hook: ``MOESD_BATCH_TEST_KILL`` = ``lines:N`` (SIGKILL the process just before
it writes its (N+1)-th line of this run) or ``torn:N`` (write half of that line, then
SIGKILL). It exists for the resume tests and is never set in normal use.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
from pathlib import Path

KILL_ENV = "MOESD_BATCH_TEST_KILL"


class JobError(RuntimeError):
    """A job-level problem the user must fix (the message says what)."""


def part_path(path: str | Path, process: int, num_processes: int) -> Path:
    """``OUTPUT.part-00001-of-00002``: process 1's share of a two-process job."""
    return Path(f"{path}.part-{process:05d}-of-{num_processes:05d}")


def rejects_path(output: str | Path) -> Path:
    """Default rejects file: ``out.jsonl`` -> ``out.rejects.jsonl``."""
    p = Path(output)
    return p.with_name(p.stem + ".rejects.jsonl") if p.suffix else Path(f"{p}.rejects.jsonl")


def _kill_hook() -> tuple[str, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    kind, _, n = spec.partition(":")
    if kind not in ("lines", "torn") or not n.isdigit():
        raise JobError(f"{KILL_ENV}={spec!r} must be lines:N or torn:N (test-only hook)")
    return kind, int(n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ResultWriter:
    """Appends result lines to a JSONL file that may hold a previous run's results.

    Attributes:
      done: canonical ids (``inputs.id_key``) already in the file.
      dropped_bytes: size of the partial last line removed at open (0 if none).
      written: lines written by this run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise JobError(f"{self.path} is locked by another running job") from None
        self.done: set[str] = set()
        end = self._scan()
        size = os.fstat(self.fd).st_size
        self.dropped_bytes = size - end
        if self.dropped_bytes:  # a kill in the middle of a write: drop the torn line
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        os.lseek(self.fd, end, os.SEEK_SET)
        self.written = 0
        self._kill = _kill_hook()

    def _scan(self) -> int:
        """Reads the ids of complete lines; returns the offset after the last one."""
        end = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    obj = json.loads(raw)
                    key = json.dumps(obj["id"], ensure_ascii=False)
                except (ValueError, KeyError, TypeError):
                    raise JobError(f"{self.path} line {n} is not a result line of this job; "
                                   "use a new --output (or remove the file)") from None
                if key in self.done:
                    raise JobError(f"{self.path} line {n} repeats id {obj['id']!r}")
                self.done.add(key)
                end += len(raw)
        return end

    def write(self, results: list[dict]) -> None:
        """Writes whole lines, then fsyncs (one call per batch)."""
        for obj in results:
            data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
            if self._kill is not None and self.written == self._kill[1]:
                if self._kill[0] == "torn":
                    _write_all(self.fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            _write_all(self.fd, data)
            self.done.add(json.dumps(obj["id"], ensure_ascii=False))
            self.written += 1
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def write_atomic(path: str | Path, lines: list[str]) -> None:
    """Replaces ``path`` with ``lines`` (each without its newline) via a temp + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rejects(path: str | Path, rejects: list[dict]) -> None:
    """The rejects file (rewritten whole: parsing is deterministic, so a rerun writes the
    same lines)."""
    write_atomic(path, [json.dumps(r, ensure_ascii=False) for r in rejects])


_PART = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


def find_parts(path: str | Path) -> tuple[list[Path], int]:
    """The part files of ``path`` and their process count (checked consistent)."""
    path = Path(path)
    found = {}
    counts = set()
    for p in path.parent.glob(path.name + ".part-*-of-*"):
        m = _PART.search(p.name)
        if m and p.name == f"{path.name}{m.group(0)}":
            found[int(m.group(1))] = p
            counts.add(int(m.group(2)))
    if not found:
        return [], 0
    if len(counts) != 1:
        raise JobError(f"parts of {path} from runs with different process counts "
                       f"{sorted(counts)}: remove the stale ones")
    return [found[i] for i in sorted(found)], counts.pop()


def merge_parts(output: str | Path, rejects: str | Path | None = None) -> dict:
    """Merges ``OUTPUT.part-*`` (and the rejects parts) into ``OUTPUT`` (and rejects).

    Output lines: the parts in process order, complete lines only; rejects sorted by input
    line. Raises JobError when a part is missing or an id appears twice.

    Returns:
      ``{"parts": P, "lines": n, "rejects": m}``.
    """
    parts, n = find_parts(output)
    if not parts:
        raise JobError(f"no part files {output}.part-*-of-* to merge")
    if len(parts) != n:
        have = sorted(int(_PART.search(p.name).group(1)) for p in parts)
        raise JobError(f"{output}: {len(parts)} of {n} parts present (processes {have}); "
                       "copy every host's part next to it first")
    lines, seen = [], set()
    for p in parts:
        with open(p, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a torn tail of a killed run: that id is not finished
                key = json.dumps(json.loads(raw)["id"], ensure_ascii=False)
                if key in seen:
                    raise JobError(f"id {key} appears in more than one part of {output}")
                seen.add(key)
                lines.append(raw.decode().rstrip("\n"))
    write_atomic(output, lines)
    out = {"parts": n, "lines": len(lines), "rejects": 0}
    if rejects is not None:
        rparts, rn = find_parts(rejects)
        if rparts:
            rows = [json.loads(line) for p in rparts for line in Path(p).read_text().splitlines()
                    if line.strip()]
            rows.sort(key=lambda r: r["line"])
            write_rejects(rejects, rows)
            out["rejects"] = len(rows)
    return out
