"""Suite-wide process settings, applied before any test module imports torch.

OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep at a barrier instead of spinning. The suite
runs torch in several processes at once on 2 cores (two benchmark smokes side by side, Ray
workers beside their driver, measurement subprocesses); a spinning thread then holds a core
that the thread it waits for needs, and every parallel region waits out a scheduler slice.
Measured on the 2-core CI machine under load: a 2-thread forward of the quickstart encoder
took 130-195 ms spinning and 2.6 ms passive (1 thread: 2.7 ms); the int8_accuracy smoke went
from 43 s to 16 s. Nothing in the suite asserts a speed, and the setting changes no result:
subprocesses and Ray workers inherit it from this environment. A value already set wins."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
