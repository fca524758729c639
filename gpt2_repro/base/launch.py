"""What the launcher started, known before accelerate starts: which process of the launch this one is."""

from __future__ import annotations

import os


def is_main_process(env=os.environ) -> bool:
    """Whether this is the main process of the launch (RANK 0, or no launcher)."""
    return env.get("RANK", "0") == "0"
