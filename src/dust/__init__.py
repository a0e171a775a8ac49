"""dust: semi-supervised medical image segmentation (DUST and its baselines on one engine)."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait hold the others up when a core is taken by another process (a laptop or
# shared server is never idle). A short spin before sleeping keeps a loaded run near its idle speed and costs an idle
# run almost nothing, where a purely passive wait costs an idle run more (measured: docs/results/speed/wait_policy.md).
# It must be set before torch loads its OpenMP runtime (libgomp on Linux), which reads it once; a policy the user
# set (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
