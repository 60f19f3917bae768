#!/usr/bin/env python
"""Predicted SD speedup vs batch, MoE vs dense (moesd_jax/cli/predict_speedup.py)."""

import sys

from moesd_jax.cli.predict_speedup import main

if __name__ == "__main__":
    sys.exit(main())
