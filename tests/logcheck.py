"""What a clean run's log must not contain: lines at WARNING or above (issue 22)."""

from __future__ import annotations

import re

# Python logging's level names, Ray's C++ glog prefix (`[2026-12-04 17:16:30,497 E 27357
# 27357] core_worker.cc:...`: W, E or F), Python warnings (`file.py:12: UserWarning: ...`) and
# Python tracebacks.
ALARM = re.compile(
    r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^\]]* [WEF] \d+ \d+\]|:\d+: \w*Warning: |Traceback"
)
# The one warning a run with random weights logs on purpose.
RANDOM_WEIGHTS = "no checkpoint: embedding with RANDOM"
# Ray Data's warning that its first operator waited over 60 s for a CPU: a fact about the
# machine, not the job. On the shared 2-core test box it appears only while other work keeps
# the load average near 100 (Ray's workers then take a minute to start); an unloaded run of
# the same config reads at once. docs/pipelines.md ("Logs") describes it.
LOADED_MACHINE = "Cluster resources are not enough to run any task from"


def alarming_lines(log: str) -> list[str]:
    """Lines of `log` at WARNING or above, except the random-weights notice and Ray Data's
    loaded-machine warning."""
    return [
        line
        for line in log.splitlines()
        if ALARM.search(line) and RANDOM_WEIGHTS not in line and LOADED_MACHINE not in line
    ]
