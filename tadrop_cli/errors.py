"""Error types and the exit codes they map to.

Every problem caused by the user's input (recipe, files, tensors) is a `BadInput`:
the CLI prints its one-line message and exits with code 2. Anything else is a bug
and exits with code 1.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def printable(text: object) -> str:
    """`text` safe to show on a terminal, on one line: every character that is not printable (ESC,
    line breaks, bidi overrides, the undecodable bytes of a file name, ...) shown as an escape such
    as \\x1b, \\n or \\u202e. For every name, path and value that came from the user."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class TadropError(Exception):
    """Base class of tadrop's own errors.

    Messages quote user-controlled text (keys, paths, tensor names), so they are made
    printable here (errors.printable): the message is always one line, with no escape sequences.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(printable(message))


class BadInput(TadropError):
    """The recipe, an input file or a tensor is at fault; the message names it."""

    exit_code = EXIT_BAD_INPUT


class WriteError(TadropError):
    """The output could not be written (disk full, permissions, ...)."""

    exit_code = EXIT_INTERNAL
