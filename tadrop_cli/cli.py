"""The command line: parse arguments, call the engine, print, pick the exit code. Nothing else."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from . import __version__
from .engine import MergeOptions, dry_run, plan_only, reuse_freed_memory, run_merge
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, TadropError
from .methods import METHODS
from .recipe import load_recipe
from .verify import verify_checkpoint

EXIT_CODES = "Exit codes: 0 done; 1 internal error (a bug, or a write failure such as a full disk); 2 bad input (recipe, files, tensors); 130 interrupted."

app = typer.Typer(
    help=f"Merge fine-tuned checkpoints of one base model, with TADrop's tensor-wise adaptive sparsification.\n\n{EXIT_CODES}",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


class RichProgress:
    """A progress bar on stderr: tensors, bytes, rate and time left."""

    def __init__(self) -> None:
        # imported here: a quiet or piped run draws no bar, and rich.progress takes ~25 ms to import
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self._bar = Progress(
            TextColumn("{task.description:>8}"), BarColumn(), TextColumn("{task.fields[tensors]}"), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=False,
        )
        self._task = None
        self._tensors = (0, 0)

    def start(self, phase: str, total_tensors: int, total_bytes: int) -> None:
        self._bar.start()
        self._tensors = (0, total_tensors)
        self._task = self._bar.add_task(phase, total=total_bytes, tensors=f"0/{total_tensors} tensors")

    def advance(self, nbytes: int) -> None:
        done, total = self._tensors[0] + 1, self._tensors[1]
        self._tensors = (done, total)
        self._bar.update(self._task, advance=nbytes, tensors=f"{done}/{total} tensors")

    def finish(self) -> None:
        self._bar.stop()


class SilentProgress:
    def start(self, phase: str, total_tensors: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _progress(quiet: bool):
    return RichProgress() if (not quiet and sys.stderr.isatty()) else SilentProgress()


def _raise_interrupt(signum, frame):  # SIGTERM ends a merge the way Ctrl-C does: cleanly
    raise KeyboardInterrupt


def _run(action: Callable[[], None]) -> None:
    """Run a command body, turning every failure into a one-line message and an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        action()
    except TadropError as error:
        err.print(f"[red]error:[/red] {error}", markup=True, soft_wrap=True)
        raise typer.Exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: nothing was published; run again with --resume to continue from the finished shards", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    except typer.Exit:
        raise
    except Exception as error:  # a bug: say so in one line; TADROP_DEBUG=1 shows the traceback
        if os.environ.get("TADROP_DEBUG"):
            traceback.print_exc()
        err.print(f"[red]internal error:[/red] {type(error).__name__}: {error} (set TADROP_DEBUG=1 for the traceback)", markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_INTERNAL)


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="The YAML recipe."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides output.path)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder (only once the new one is complete)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted merge from its finished shards."),
    dry: bool = typer.Option(False, "--dry-run", help="Check the recipe and every input header, print what would be written, write nothing."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (overrides the recipe)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Merge the checkpoints a recipe names into one safetensors checkpoint."""

    def action() -> None:
        loaded = load_recipe(recipe)
        options = MergeOptions(output=output, overwrite=overwrite, resume=resume, device=device)
        if dry:
            summary = dry_run(loaded, options)
            if as_json:
                _print_json(summary)
            elif not quiet:
                err.print(f"dry run: {summary['tensors']} tensors in {len(summary['shards'])} shard(s) to {summary['output']}; "
                          f"reads {_human_size(summary['bytes_to_read'])}, writes {_human_size(summary['bytes_to_write'])}, "
                          f"peak memory about {_human_size(summary['estimated_peak_memory_bytes'])}, about {summary['estimated_seconds']} s")
                for note in summary["notes"]:
                    err.print(f"note: {note}", soft_wrap=True)
            return
        summary = run_merge(loaded, options, _progress(quiet))
        if as_json:
            _print_json(summary)
        if not quiet:
            for note in summary["notes"]:
                err.print(f"note: {note}", soft_wrap=True)
            err.print(f"merged {summary['tensors']} tensors ({_human_size(summary['bytes_written'])}) into {summary['output']} "
                      f"in {summary['seconds']:.1f} s, peak memory {_human_size(summary['peak_rss_bytes'])}")

    _run(action)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="The YAML recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the plan as CSV on stdout."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run pass 1 only: show each tensor's TADrop score and drop ratio, per model."""

    def action() -> None:
        loaded = load_recipe(recipe)
        _, result = plan_only(loaded, device, _progress(quiet or as_json or as_csv))
        if as_json:
            _print_json(result.to_json())
        elif as_csv:
            writer = csv.writer(sys.stdout)
            writer.writerow(["model", "tensor", "numel", "score", "normalized", "base_ratio", "ratio", "reason"])
            for row in result.rows:
                writer.writerow([row.model, row.tensor, row.numel, "" if row.score is None else f"{row.score:.6g}",
                                 "" if row.normalized is None else f"{row.normalized:.4f}", f"{row.base_ratio:.4f}", f"{row.ratio:.4f}", row.reason])
        else:
            from rich.table import Table

            out = Console(highlight=False)
            table = Table(title=f"{loaded.merge_method} plan: drop ratio per tensor")
            for column in ("model", "tensor", "elements", "score", "s", "base p", "p", "why"):
                table.add_column(column, justify="right" if column in ("elements", "score", "s", "base p", "p") else "left")
            for row in result.rows:
                table.add_row(row.model, row.tensor, f"{row.numel:,}", "" if row.score is None else f"{row.score:.4g}",
                              "" if row.normalized is None else f"{row.normalized:.2f}", f"{row.base_ratio:.3f}", f"{row.ratio:.3f}", row.reason)
            out.print(table)
            for m in result.models:
                out.print(f"{m.model}: mean drop {m.mean_ratio:.4f} (uniform {m.mean_base_ratio:.4f}), range {m.min_ratio:.3f}-{m.max_ratio:.3f}, "
                          f"{m.adaptive_tensors} adaptive tensors" + ("" if m.budget_met else ", budget NOT met (clipping)"))

    _run(action)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the merge methods and their parameters."""
    rows = [
        {"name": m.name, "description": m.description, "tadrop": m.sparsifier or "-", "reference": m.reference,
         "parameters": {p.name: {"default": p.default, "per_model": p.per_model, "doc": p.doc} for p in m.params}}
        for m in METHODS.values()
    ]
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title="merge methods")
    for column in ("method", "what it does", "TADrop enters", "parameters (default)"):
        table.add_column(column)
    for row in rows:
        params = ", ".join(f"{name}={spec['default']}" + ("*" if spec["per_model"] else "") for name, spec in row["parameters"].items())
        table.add_row(row["name"], row["description"], row["tadrop"], params)
    console = Console(highlight=False)
    console.print(table)
    console.print("* per-model parameter: set under parameters globally, per model, or per tensor filter")


@app.command()
def verify(
    checkpoint: str = typer.Argument(..., help="A checkpoint folder or file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check that every tensor of a checkpoint reads back, with no NaN or Inf."""

    def action() -> None:
        report = verify_checkpoint(checkpoint)
        if as_json:
            _print_json(report)
        else:
            err.print(f"{checkpoint}: {report['tensors']} tensors, {_human_size(report['bytes'])}, all finite: ok")

    _run(action)


def _version(value: bool) -> None:
    if value:
        from . import kernels

        print(f"tadrop {__version__} (CPU kernels: {'built' if kernels.available() else 'not built, PyTorch runs every merge'})")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    pass


def main() -> None:
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
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`), or a closed stream
            pass
    os._exit(code)
