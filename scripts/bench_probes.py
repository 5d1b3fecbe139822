#!/usr/bin/env python3
"""Moved into the package: ``qprobes bench`` (see docs/BENCHMARKS.md). This runs it."""

import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from qprobes.frontends.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
