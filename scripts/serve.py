#!/usr/bin/env python
"""OpenAI-compatible server (moesd_jax/cli/serve.py; installed as `moesd-serve`)."""

import sys

from moesd_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
