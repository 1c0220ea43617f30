"""What a clean run's log must not contain: lines at WARNING or above (issue 22)."""

from __future__ import annotations

import re

# Python logging's level names, Ray's C++ glog prefix (`[2026-12-04 17:16:30,497 E 27357
# 27357] core_worker.cc:...`: W, E or F) and Python tracebacks.
ALARM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^\]]* [WEF] \d+ \d+\]|Traceback")
# The one warning a run with random weights logs on purpose.
RANDOM_WEIGHTS = "no checkpoint: embedding with RANDOM"


def alarming_lines(log: str) -> list[str]:
    """Lines of `log` at WARNING or above, except the random-weights notice."""
    return [line for line in log.splitlines() if ALARM.search(line) and RANDOM_WEIGHTS not in line]
