"""Ctrl-C (SIGINT) and SIGTERM end tadrop the same way, whenever they come: exit 130 and one line.

The handlers are installed first thing in the program, before the imports that take a second.
Inside a command's body (`raising()`), the first signal raises KeyboardInterrupt, so that the
engine keeps its finished shards and the CLI says what is true; anywhere else (the imports,
argument parsing, the final printing) and on a second signal, the process stops at once.

Python runs a handler between bytecodes of the main thread: a blocking open or read done by Python
itself is interrupted (PEP 475: the handler runs, and its exception ends the call). C code that holds
the GIL and retries the call (safetensors opening a FIFO) never lets it run: such files must be refused before
they reach it (checkpoint.py opens only regular files), or only SIGKILL ends the wait.
"""

from __future__ import annotations

# only modules the interpreter has loaded by now, or nearly: the handlers must come before anything slow
import os
import signal
from contextlib import contextmanager

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_raising = False  # inside a command's body: the first signal raises KeyboardInterrupt
_raised = False  # it has: a further signal stops at once
_installed = False
_holding = False  # within held(): a signal is noted in _pending and handled when the block ends
_pending = False
_message = "interrupted"  # what stop_now says: changed once the output is published (finished())
_published: str | None = None  # the output the engine has just published (published()), until finished()


def stop_now(message: str = "") -> None:
    """Write one line to stderr (fd 2, no Python buffers) and exit 130 without cleanup."""
    message = message or _message
    try:
        lead = "\x1b[?25h\r\n" if os.isatty(2) else ""  # a progress bar may have hidden the cursor
        os.write(2, f"{lead}{message}\n".encode())
    except OSError:  # stderr closed: the exit status says it
        pass
    os._exit(EXIT_INTERRUPTED)


def _on_signal(signum: int, frame: object) -> None:
    global _raised, _pending
    if _holding:
        _pending = True
        return
    if _raising and not _raised:
        _raised = True
        raise KeyboardInterrupt
    stop_now()


def install() -> None:
    """Install the handlers; call first thing in the program's main thread. Idempotent."""
    global _installed
    if _installed:
        return
    for number in SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:  # `nohup` and background jobs keep ignoring them
            signal.signal(number, _on_signal)
    _installed = True


@contextmanager
def raising():  # -> Iterator[None]; typing is not imported here (~10 ms)
    """Within: the first SIGINT/SIGTERM raises KeyboardInterrupt (for cleanup and an honest message)."""
    global _raising, _raised, _message, _published
    _raising, _raised, _message, _published = True, False, "interrupted", None
    try:
        yield
    finally:
        _raising = False


@contextmanager
def held():
    """Within: a SIGINT or SIGTERM waits until the block is done (a step that must not be cut in two,
    such as publishing the output), and is handled as the block ends. (Python runs handlers in the main
    thread only, so a flag serves; a signal mask would not: the kernels' threads would take the signal.)"""
    global _holding, _pending
    _holding, _pending = True, False
    try:
        yield
    finally:
        _holding = False
    if _pending:
        _pending = False
        _on_signal(0, None)


def published(output: str) -> None:
    """The engine has published `output`: a KeyboardInterrupt from now on, until finished(), is
    said to have come once the output was complete (published_output()), never that nothing was."""
    global _published
    _published = output


def published_output() -> str | None:
    """The output published since the command began (published()), if any."""
    return _published


def finished(message: str) -> None:
    """The command's work is done (the output is published): a signal from now on stops at once and
    says `message`, never that nothing was published."""
    global _raising, _message
    _raising, _message = False, message
