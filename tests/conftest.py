"""Test tiers: tests/unit (pure: no Ray runtime, no subprocess; `make test-fast`) and tests/integration (real
Ray, MLflow and servers on 127.0.0.1). Shared helpers are in tests/support."""

from __future__ import annotations

import os

from vitlab.cluster import LOOPBACK_ENV

# Every Ray the tests start keeps its traffic on loopback (Ray resolves 127.0.0.1 to the interface address
# otherwise); set before any Ray is imported, and inherited by the processes the tests run.
os.environ[LOOPBACK_ENV] = "0"
# No usage telemetry from any process of the suite (MLflow's client and server send it by default): the tests'
# traffic stays on 127.0.0.1.
os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")

# The Train controller polls its workers for reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# taking one report per worker per poll: the tests' epochs and checkpoints last well under that, so each report
# would wait on the poll. A quarter second keeps a tiny run's reports from queueing (a 2-epoch run: 24 s -> 18 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
