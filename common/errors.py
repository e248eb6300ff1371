"""One exception type for problems with the user's input, and library warnings shown as one line each.

The CLI prints its message on one line and exits with status 2, so every module raises it with a message
that names the file (or argument) and the problem instead of letting a deep traceback escape.
"""
import logging
import sys


class WorkbenchError(Exception):
    """A problem the user can fix (bad file, bad flag, mismatched model); never a bug in the workbench."""


class _StderrWarnings(logging.Handler):
    """Library warnings (damaged caches, questions beyond the data, overlaps) as one `warning: ...` line."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


# the workbench's packages that log warnings: the CLI shows theirs, and so does each Ray worker of a sweep
WORKBENCH_LOGGERS = ("calib", "data", "engines", "eval", "qat")


def warnings_to_stderr(*loggers: str) -> None:
    """Show the WARNING records of these loggers (default: WORKBENCH_LOGGERS) on stderr, once each."""
    for logger in map(logging.getLogger, loggers or WORKBENCH_LOGGERS):
        if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
            logger.addHandler(_StderrWarnings(logging.WARNING))


def exit_status(work) -> int:
    """Run `work()` for a `python -m` entry point: 0, or a WorkbenchError as one `error: ...` line and 2 (as
    cli.py does for its verbs)."""
    try:
        work()
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
