"""Resumable batch-decoding jobs over JSONL files (``moesd-batch-decode``).

- ``inputs``: input lines -> validated requests or rejects; the per-line seed rule and
  the multi-process split.
- ``outputs``: the resumable result writer (whole lines, torn tail dropped at restart),
  per-process parts and their merge.
- ``job``: static batches through one compiled :class:`~moesd_jax.spec.decoder.SpecDecoder`
  program, collective across processes under a mesh.

The command line is ``moesd_jax/cli/batch_decode.py``; README "Batch jobs" has the user
view.
"""

from moesd_jax.batch.inputs import Defaults, Limits, Request, read_requests
from moesd_jax.batch.job import job_shape, run_job
from moesd_jax.batch.outputs import JobError, ResultWriter, merge_parts, part_path

__all__ = ["Defaults", "JobError", "Limits", "Request", "ResultWriter", "job_shape",
           "merge_parts", "part_path", "read_requests", "run_job"]
