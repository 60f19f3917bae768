#!/usr/bin/env python
"""Routing report: measured vs independence (moesd_jax/cli/analyze_routing.py)."""

import sys

from moesd_jax.cli.analyze_routing import main

if __name__ == "__main__":
    sys.exit(main())
