"""The command line: parse arguments, call the engine, print, pick the exit code. Nothing else.

Printing: every name, path and value that came from the user goes through errors.printable and
is printed as plain text, never as rich markup. What goes to a file or a pipe is never wrapped or
truncated: one-line messages stay one line, and tables become tab-separated lines.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from . import __version__, interrupts
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, BadInput, TadropError, printable
from .methods import METHODS
from .recipe import load_merges, load_recipe
from .run import (
    MergeOptions,
    NoProgress,
    dry_run,
    dry_run_merges,
    plan_only,
    reuse_freed_memory,
    run_merge,
    run_merges,
)
from .verify import verify_checkpoint

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer, with click itself
    from click.exceptions import ClickException

EXIT_CODES = (
    "Exit codes: 0 done; 1 internal error (a bug, or a write failure such as a full disk); "
    "2 bad input (recipe, files, tensors, arguments); 130 interrupted (Ctrl-C or SIGTERM)."
)

# plain text on stderr: no markup, no emoji codes, no highlighting of numbers or paths
err = Console(stderr=True, highlight=False, markup=False, emoji=False)


# ---------------------------------------------------------------- printing


def say(text: str | Text) -> None:
    """One message on stderr, never wrapped by rich: a terminal wraps it itself, a file or pipe gets one line.
    A closed or broken stderr loses the message, not the exit status."""
    try:
        err.print(text, soft_wrap=True)
    except (OSError, ValueError):
        pass


def say_error(label: str, message: object) -> None:
    say(Text.assemble((f"{label}:", "red"), " ", printable(message)))


def is_terminal(stream: object) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, OSError, ValueError):  # a closed stream
        return False


class StdoutGone(Exception):
    """stdout is closed, full or its reader has gone; `broken_pipe`: the reader stopped reading (`| head`)."""

    def __init__(self, reason: str, broken_pipe: bool):
        super().__init__(reason)
        self.broken_pipe = broken_pipe


def write_stdout(text: str) -> None:
    """Write `text` to stdout and flush it; StdoutGone where it cannot be written."""
    stream = sys.stdout
    if stream is None:  # started with stdout closed (`>&-`)
        raise StdoutGone("stdout is closed", broken_pipe=False)
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        raise StdoutGone("stdout: the reader has gone (broken pipe)", broken_pipe=True) from None
    except (OSError, ValueError) as error:
        raise StdoutGone(f"stdout: {getattr(error, 'strerror', None) or error}", broken_pipe=False) from None


def _print_json(data: object) -> None:
    write_stdout(json.dumps(data, indent=2) + "\n")


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """A table for files and pipes: tab-separated lines, every cell whole and made printable."""
    return "".join("\t".join(printable(cell) for cell in row) + "\n" for row in [header, *rows])


def terminal_table(title: str, header: list[str], rows: list[list[str]], right: set[str], folded: set[str]) -> str:
    """A boxed table for a terminal, as text; cells are plain text, and `folded` columns (names) wrap
    onto more lines rather than being cut."""
    from rich.table import Table  # ~25 ms to import: only where a table is drawn

    table = Table(title=title)
    for column in header:
        table.add_column(
            column, justify="right" if column in right else "left", overflow="fold" if column in folded else "ellipsis"
        )
    for row in rows:
        table.add_row(*(Text(printable(cell)) for cell in row))
    width = Console(stderr=False).width if is_terminal(sys.stdout) else 80
    console = Console(file=io.StringIO(), width=width, force_terminal=True, highlight=False, markup=False, emoji=False)
    console.print(table)
    return console.file.getvalue()


def table_text(
    title: str, header: list[str], rows: list[list[str]], right: set[str] = frozenset(), folded: set[str] = frozenset()
) -> str:
    if is_terminal(sys.stdout):
        return terminal_table(title, header, rows, right, folded)
    return plain_table(header, rows)


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


# ---------------------------------------------------------------- progress


class RichProgress:
    """A progress bar on stderr, one per phase: tensors, bytes, rate and time left."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None
        self._tensors = (0, 0)
        self._partial = 0  # bytes of the current tensor reported by part()

    def start(self, phase: str, total_tensors: int, total_bytes: int) -> None:
        # imported here: a quiet or piped run draws no bar, and rich.progress takes ~25 ms to import
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.finish()  # a fresh bar per phase: the finished one stays on screen once, as it ended
        self._bar = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self._tensors, self._partial = (0, total_tensors), 0
        self._task = self._bar.add_task(phase, total=total_bytes, tensors=f"0/{total_tensors} tensors")
        self._bar.start()

    def part(self, nbytes: int) -> None:
        self._partial += nbytes
        self._bar.update(self._task, advance=nbytes)

    def advance(self, nbytes: int) -> None:
        done, total = self._tensors[0] + 1, self._tensors[1]
        self._tensors = (done, total)
        self._bar.update(self._task, advance=max(0, nbytes - self._partial), tensors=f"{done}/{total} tensors")
        self._partial = 0

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def progress_bar(quiet: bool) -> Iterator[RichProgress | NoProgress]:
    """A bar on a terminal's stderr unless quiet; stopped on the way out, so that whatever is printed
    next (an interrupt, an error) lands below it, on a line of its own."""
    progress = RichProgress() if (not quiet and is_terminal(sys.stderr)) else NoProgress()
    try:
        yield progress
    finally:
        progress.finish()


# ---------------------------------------------------------------- running a command


def complete_message(output: str) -> str:
    return f"interrupted once the merge was published: {printable(output)} is complete"


def interrupted_message(stop: BaseException, merging: bool) -> str:
    """What is true after an interrupt: the engine tells how many finished shards it kept, and
    whether (or which earlier merge of a multi-document recipe) it had published."""
    published = getattr(stop, "published", None)
    earlier = interrupts.published_output()
    if published is None and not hasattr(stop, "finished_shards"):  # after the engine's publish (run_merge)
        published = earlier
    if published is not None:
        return complete_message(published)
    unpublished = (
        "nothing was published"
        if earlier is None
        else f"{printable(earlier)} is complete, but the merge after it was not published"
    )
    finished = getattr(stop, "finished_shards", None)
    if finished is None:  # before the merge began writing, or not a merge
        return f"interrupted: {unpublished}" if merging else "interrupted"
    if finished == 0:
        return f"interrupted: {unpublished}, and no shard was finished; run again to start over"
    return (
        f"interrupted: {unpublished}; {finished} finished shard{'s' if finished != 1 else ''} kept: "
        "run again with --resume to continue from them"
    )


def _run(action: Callable[[], None], merging: bool = False) -> None:
    """Run a command body, turning every failure into a one-line message and an exit code."""
    try:
        with interrupts.raising():
            action()
    except TadropError as error:
        say_error("error", error)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as stop:
        say(interrupted_message(stop, merging))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except StdoutGone as gone:  # a reader that stopped early (`| head`) is no failure; a closed stdout is
        if gone.broken_pipe:
            raise typer.Exit(EXIT_OK) from None
        say_error("error", f"{gone}: nothing was printed")
        raise typer.Exit(EXIT_INTERNAL) from None
    except typer.Exit:
        raise
    except Exception as error:  # a bug: say so in one line; TADROP_DEBUG=1 shows the traceback
        if os.environ.get("TADROP_DEBUG"):
            traceback.print_exc()
        say_error("internal error", f"{type(error).__name__}: {error} (set TADROP_DEBUG=1 for the traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None


# ---------------------------------------------------------------- typer/click adapted


class _Plain:
    """What tadrop's commands and group change in click's behaviour:
    - a flag's help shows no value (typer shows <bool>, and `--overwrite true` then fails);
    - a usage error (unknown option, command or extra argument) is one line on stderr, exit 2."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and not getattr(param, "count", False):
                param.metavar = ""
        return params

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as error:
            code = error.exit_code
            if type(error).__name__ == "NoArgsIsHelpError":  # the help was the message
                if error.format_message().strip():
                    error.show()
            else:
                say_error("error", _usage_message(error))
        except typer.Abort:
            say("interrupted")
            code = EXIT_INTERRUPTED
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_message(error: ClickException) -> str:
    message = " ".join(error.format_message().split())  # one line
    context = getattr(error, "ctx", None)
    if context is not None and context.help_option_names:
        message += f" (see '{context.command_path} {context.help_option_names[-1]}')"
    return message


class PlainGroup(_Plain, TyperGroup):
    pass


class PlainCommand(_Plain, TyperCommand):
    pass


app = typer.Typer(
    help="Merge fine-tuned checkpoints of one base model, with TADrop's tensor-wise adaptive sparsification."
    f"\n\n{EXIT_CODES}",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=PlainGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ---------------------------------------------------------------- commands


# what `--overwrite true` would leave as OUT_DIR: a flag's value, not a folder anyone means
FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def output_folder(out_dir: Path | None, output: Path | None) -> Path | None:
    """The output from the positional OUT_DIR (mergekit's habit) or --output; both must agree."""
    if out_dir is not None and str(out_dir).lower() in FLAG_VALUES:
        raise BadInput(
            f"OUT_DIR {out_dir}: flags take no value (write --overwrite, not --overwrite {out_dir}); "
            f"for a folder of that name write ./{out_dir}"
        )
    if out_dir is not None and output is not None and os.path.abspath(out_dir) != os.path.abspath(output):
        raise BadInput(f"OUT_DIR {out_dir} and --output {output} name different folders: give one of them")
    return output if output is not None else out_dir


def dry_run_line(summary: dict) -> str:
    return (
        f"dry run: {summary['tensors']} tensors in {summary['shards']} shard(s) to {printable(summary['output'])}; "
        f"reads {_human_size(summary['bytes_to_read'])}, writes {_human_size(summary['bytes_to_write'])}, "
        f"peak memory about {_human_size(summary['estimated_peak_memory_bytes'])}, "
        f"about {summary['estimated_seconds']} s"
    )


def merged_line(summary: dict) -> str:
    return (
        f"merged {summary['tensors']} tensors ({_human_size(summary['bytes_written'])}) into "
        f"{printable(summary['output'])} in {summary['seconds']:.1f} s, "
        f"peak memory {_human_size(summary['peak_rss_bytes'])}"
    )


def _say_notes(notes: list[str]) -> None:
    for note in notes:
        say(f"note: {printable(note)}")


@app.command(cls=PlainCommand)
def merge(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The YAML recipe."),
    out_dir: Path | None = typer.Argument(
        None, metavar="OUT_DIR", show_default=False, help="Output folder, as mergekit takes it (the same as --output)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="DIR", help="Output folder (overrides output.path)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output folder (only once the new one is complete)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Refuse (exit 2), rather than start over, if the partial merge at the output "
        "is of another recipe, changed inputs, another tadrop version or device. "
        "A plain run resumes what it can prove and otherwise starts over, with a note.",
    ),
    dry: bool = typer.Option(
        False, "--dry-run", help="Check the recipe and every input header, print what would be written, write nothing."
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (overrides the recipe)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    intermediate_dir: Path | None = typer.Option(
        None,
        "--intermediate-dir",
        "-I",
        metavar="DIR",
        help="A multi-document recipe's named merges are written to DIR/<name> (unless they give output.path).",
    ),
) -> None:
    """Merge the checkpoints a recipe names into one safetensors checkpoint."""

    def action() -> None:
        target = output_folder(out_dir, output)
        options = MergeOptions(output=target, overwrite=overwrite, resume=resume, device=device)
        steps = load_merges(recipe, intermediate_dir)
        if steps is not None:
            _merge_steps(steps, options, dry, quiet, as_json)
            return
        loaded = load_recipe(recipe)
        if dry:
            summary = dry_run(loaded, options)
            if as_json:
                _print_json(summary)
            elif not quiet:
                say(dry_run_line(summary))
                _say_notes(summary["notes"])
            return
        with progress_bar(quiet) as progress:
            summary = run_merge(loaded, options, progress)
        interrupts.finished(complete_message(summary["output"]))
        if as_json:
            try:
                _print_json(summary)
            except StdoutGone as gone:  # the merge is published all the same: that is what the status says
                if not gone.broken_pipe:
                    say(f"note: the JSON summary was not printed ({gone}); the merge itself is complete")
        if not quiet:
            _say_notes(summary["notes"])
            say(merged_line(summary))

    _run(action, merging=True)


def _merge_steps(steps: list, options: MergeOptions, dry: bool, quiet: bool, as_json: bool) -> None:
    """A multi-document recipe: each merge in turn, a line for each."""
    if dry:
        summary = dry_run_merges(steps, options)
    else:
        with progress_bar(quiet) as progress:
            summary = run_merges(steps, options, progress)
        interrupts.finished(complete_message(summary["output"]))
    if as_json:
        _print_json(summary)
    if quiet or as_json:
        return
    for merge in summary["merges"]:
        label = printable(merge["name"] or "final merge")
        if merge.get("skipped"):
            say(f"{label}: {printable(merge['output'])} is already this merge's output; skipped")
        elif dry and not merge["checked"]:
            say(f"{label}: {printable(merge['notes'][0])}")
        else:
            say(f"{label}: " + (dry_run_line(merge) if dry else merged_line(merge)))
            _say_notes(merge["notes"])


PLAN_HEADER = ["model", "tensor", "elements", "score", "s", "base p", "p", "why"]


def plan_rows(result) -> list[list[str]]:
    return [
        [
            row.model,
            row.tensor,
            f"{row.numel:,}",
            "" if row.score is None else f"{row.score:.4g}",
            "" if row.normalized is None else f"{row.normalized:.2f}",
            f"{row.base_ratio:.3f}",
            f"{row.ratio:.3f}",
            row.reason,
        ]
        for row in result.rows
    ]


def plan_csv(result) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "tensor", "numel", "score", "normalized", "base_ratio", "ratio", "reason"])
    for row in result.rows:  # CSV quotes any cell; control characters shown as escapes all the same
        writer.writerow(
            [
                printable(row.model),
                printable(row.tensor),
                row.numel,
                "" if row.score is None else f"{row.score:.6g}",
                "" if row.normalized is None else f"{row.normalized:.4f}",
                f"{row.base_ratio:.4f}",
                f"{row.ratio:.4f}",
                printable(row.reason),
            ]
        )
    return buffer.getvalue()


def plan_model_lines(result) -> str:
    return "".join(
        f"{printable(m.model)}: mean drop {m.mean_ratio:.4f} (uniform {m.mean_base_ratio:.4f}), "
        f"range {m.min_ratio:.3f}-{m.max_ratio:.3f}, "
        f"{m.adaptive_tensors} adaptive tensors" + ("" if m.budget_met else ", budget NOT met (clipping)") + "\n"
        for m in result.models
    )


@app.command(cls=PlainCommand)
def plan(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The YAML recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the plan as CSV on stdout."),
    device: str | None = typer.Option(None, "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run pass 1 only: show each tensor's TADrop score and drop ratio, per model."""

    def action() -> None:
        if as_json and as_csv:
            raise BadInput("--json and --csv: choose one format")
        loaded = load_recipe(recipe)
        with progress_bar(quiet or as_json or as_csv) as progress:
            _, result = plan_only(loaded, device, progress)
        if as_json:
            _print_json(result.to_json())
        elif as_csv:
            write_stdout(plan_csv(result))
        else:
            write_stdout(
                table_text(
                    f"{loaded.merge_method} plan: drop ratio per tensor",
                    PLAN_HEADER,
                    plan_rows(result),
                    right={"elements", "score", "s", "base p", "p"},
                    folded={"model", "tensor"},
                )
                + plan_model_lines(result)
            )

    _run(action)


def method_rows() -> list[dict]:
    return [
        {
            "name": m.name,
            "description": m.description,
            "tadrop": m.sparsifier or "-",
            "reference": m.reference,
            "parameters": {p.name: {"default": p.default, "per_model": p.per_model, "doc": p.doc} for p in m.params},
        }
        for m in METHODS.values()
    ]


@app.command(cls=PlainCommand)
def methods(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the merge methods and their parameters."""

    def action() -> None:
        rows = method_rows()
        if as_json:
            _print_json(rows)
            return
        cells = [
            [
                row["name"],
                row["description"],
                row["tadrop"],
                ", ".join(
                    f"{name}={spec['default']}" + ("*" if spec["per_model"] else "")
                    for name, spec in row["parameters"].items()
                ),
            ]
            for row in rows
        ]
        header = ["method", "what it does", "TADrop enters", "parameters (default)"]
        write_stdout(
            table_text("merge methods", header, cells, folded={"method", "parameters (default)"})
            + "* per-model parameter: set under parameters globally, per model, or per tensor filter\n"
        )

    _run(action)


@app.command(cls=PlainCommand)
def verify(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint folder or file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check that every tensor of a checkpoint reads back, with no NaN or Inf."""

    def action() -> None:
        report = verify_checkpoint(checkpoint)
        if as_json:
            _print_json(report)
        else:
            say(f"{printable(checkpoint)}: {report['tensors']} tensors, {_human_size(report['bytes'])}, all finite: ok")

    _run(action)


def _version(value: bool) -> None:
    if value:
        from . import kernels

        built = "built" if kernels.available() else "not built, PyTorch runs every merge"
        line = f"tadrop {__version__} (CPU kernels: {built})\n"
        _run(lambda: write_stdout(line))
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


def main() -> None:
    interrupts.install()  # where `tadrop` starts here rather than in __main__ (an older install's script)
    reuse_freed_memory()  # this process is ours: tune its allocator for the engine's slices
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code
    _exit_at_once(code)


def _exit_at_once(code: object) -> None:
    """Exit without the interpreter's teardown, which frees every module and object one by one
    and with torch loaded takes ~0.3 s. Nothing is lost: by now the command has closed and
    fsynced what it wrote, and only stdout and stderr need flushing."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints it and exits with 1
        say(printable(code))
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # started with the stream closed (`>&-`)
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`), or a closed stream
            pass
    os._exit(code)
