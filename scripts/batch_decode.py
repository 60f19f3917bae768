#!/usr/bin/env python
"""Resumable batch decoding of a JSONL file (moesd_jax/cli/batch_decode.py;
`moesd-batch-decode`)."""

import sys

from moesd_jax.cli.batch_decode import main

if __name__ == "__main__":
    sys.exit(main())
