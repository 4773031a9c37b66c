"""One torch thread per process while testing.

The suite runs coordinators, sites and Ray workers beside pytest on a 2-core machine, and torch's
default (a thread per core in every process) oversubscribes it: OpenMP threads then spin-wait on
each other. Measured under load: the evaluation game of tests/test_hostile_coordinator.py took
5.5 s with two threads and 1.0 s with one. Set before torch loads; every process a test starts
inherits it. An explicit OMP_NUM_THREADS is kept.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
