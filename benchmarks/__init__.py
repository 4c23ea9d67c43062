"""Benchmarks of optax_balance: ``python -m benchmarks.run`` (or ``make bench``)."""

import os

# torch's OpenMP threads spin-wait after each call by default, stealing the cores from the
# XLA call timed next in the same round; make them sleep instead (read when torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
