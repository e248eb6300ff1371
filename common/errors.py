"""One exception type for problems with the user's input.

The CLI prints its message on one line and exits with status 2, so every module raises it with a message
that names the file (or argument) and the problem instead of letting a deep traceback escape.
"""


class WorkbenchError(Exception):
    """A problem the user can fix (bad file, bad flag, mismatched model); never a bug in the workbench."""
