#!/usr/bin/env python
"""Generate with AR or speculative decoding (moesd_jax/cli/generate.py; `moesd-generate`)."""

import sys

from moesd_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
