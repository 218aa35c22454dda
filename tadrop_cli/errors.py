"""Error types and the exit codes they map to.

Every problem caused by the user's input (recipe, files, tensors) is a `BadInput`:
the CLI prints its one-line message and exits with code 2. Anything else is a bug
and exits with code 1.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class TadropError(Exception):
    """Base class of tadrop's own errors.

    Messages quote user-controlled text (keys, paths, tensor names), so line breaks in
    them are escaped here: the message is always one line.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class BadInput(TadropError):
    """The recipe, an input file or a tensor is at fault; the message names it."""

    exit_code = EXIT_BAD_INPUT


class WriteError(TadropError):
    """The output could not be written (disk full, permissions, ...)."""

    exit_code = EXIT_INTERNAL
