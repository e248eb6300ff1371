"""Tasks for eval.distributed.run_tasks in tests/test_ray_sweep.py, in a module of its own: Ray's workers import a
task's function by its module's name, and pytest imports test modules under names they cannot import."""
from __future__ import annotations

import os


def report_pid(name: str, fail: str | None) -> int:
    """The process id of the worker that ran task `name` (the test hook's "exit" ends that worker first)."""
    if fail == "exit":
        os._exit(3)
    return os.getpid()


def warning_handlers(name: str, fail: str | None) -> list[str]:
    """The handlers on the `engines` logger of the worker that ran task `name`: how its warnings are shown."""
    import logging

    return [type(h).__name__ for h in logging.getLogger("engines").handlers]
