"""Thread priorities: background stages (tier 2, test-time training) yield the CPU to tier 1."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

TIER2_NICE = 10  # tier 2 is background work: on a small box tier 1 must win the CPU


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux: per thread; threads it starts later, such as
    its OpenMP workers, inherit it). Best effort: elsewhere, or when refused, it changes nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:
        logger.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)
