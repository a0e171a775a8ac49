"""The ``dust`` command. Importing it sets the process's OpenMP wait policy, before torch loads (``import dust``
itself leaves the environment alone: a library does not change its host's process).

OpenMP threads that spin while they wait hold the others up when a core is taken by another process (a laptop or
shared server is never idle). A short spin before sleeping keeps a loaded run near its idle speed and costs an idle
run almost nothing, where a purely passive wait costs an idle run more (measured: docs/results/speed/wait_policy.md).
libgomp reads it once, when torch loads it; a policy the user set (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
