"""The command line as a person meets it: signals at any moment, names that look like markup or hold
control characters, output to pipes, files and closed streams, help, and usage mistakes.

Most cases run `python -m tadrop_cli` in a subprocess (the real entry point, real signals); a few run
under a pseudo-terminal (pty) where a progress bar is drawn; the rest in this process.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, basic_recipe, fine_tune, run_cli, tiny_state, write_checkpoint, write_recipe
from typer.testing import CliRunner

from tadrop_cli import cli, run, staging, tensor_merge
from tadrop_cli.cli import app
from tadrop_cli.errors import BadInput, printable
from tadrop_cli.methods import METHODS

HOSTILE = ["model.[/x].weight", "model.[v2].weight", "model.\x1b[31mred.weight", "model.two\nlines.weight"]
ESCAPED = ["model.[/x].weight", "model.[v2].weight", "model.\\x1b[31mred.weight", "model.two\\nlines.weight"]


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def no_raw_controls(text: str) -> None:
    """Nothing printed holds a raw escape or stray control character (line ends and tabs are ours)."""
    assert not any(c != "\n" and c != "\t" and not c.isprintable() for c in text), repr(text)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = tiny_state()
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(2):
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune(base, i))
    return paths


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a fine-tune whose tensor names and folder look like markup and hold control
    characters; the fine-tune has an extra tensor (a note names it). Returns (recipe, output)."""
    g = torch.Generator().manual_seed(7)
    base = {name: torch.randn(64, 64, generator=g) for name in HOSTILE}
    tuned = fine_tune(base, 0)
    tuned["extra.[/x].\x1b[2J.weight"] = torch.zeros(4)
    folder = tmp_path / "in[v2][/x]"
    models = {
        "base": write_checkpoint(folder / "base", base),
        "ft0": write_checkpoint(folder / "ft[v2]\x1b[31m0", tuned),
    }
    output = tmp_path / "out[v2]"
    return write_recipe(tmp_path, basic_recipe(models, output, method="ties", tadrop={})), output


@pytest.fixture
def recipe(tmp_path: Path, models) -> tuple[Path, Path]:
    output = tmp_path / "out"
    return write_recipe(tmp_path, basic_recipe(models, output)), output


# ---------------------------------------------------------------- names are data, never markup


def test_printable_escapes_controls_and_keeps_the_rest():
    assert printable("a[/x]b[v2]") == "a[/x]b[v2]"
    assert printable("a\x1b[31mb\nc\td\r") == "a\\x1b[31mb\\nc\\td\\r"
    assert printable("é 中 \u202e \udcff \x7f \x85") == "é 中 \\u202e \\udcff \\x7f \\x85"
    assert str(BadInput("x\x1b]0;title\x07y")) == "x\\x1b]0;title\\x07y"


def test_merge_with_hostile_names_succeeds_and_prints_them_escaped(hostile):
    recipe, output = hostile
    result = run_cli("merge", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    no_raw_controls(result.stderr)
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"merged 4 tensors (65.5 KB) into {output} in "), result.stderr
    note = next(line for line in lines if line.startswith("note: "))
    assert "extra.[/x].\\x1b[2J.weight" in note and "ft[v2]\\x1b[31m0" in note, note
    from safetensors import safe_open

    with safe_open(str(output / "model.safetensors"), "np") as handle:
        assert sorted(handle.keys()) == sorted(HOSTILE)


def test_error_messages_keep_brackets_and_escape_controls(hostile):
    recipe, output = hostile
    output.mkdir()
    result = run_cli("merge", str(recipe))
    assert result.returncode == 2
    assert one_line(result.stderr) == f"error: {output}: output exists (use --overwrite to replace it)"
    result = run_cli("merge", str(recipe), "-o", str(output.parent / "new\x1b[31m[/x]"))
    assert result.returncode == 0, result.stderr
    no_raw_controls(result.stderr)
    assert f"into {output.parent}/new\\x1b[31m[/x] in" in result.stderr


def test_plan_and_csv_print_hostile_names_whole_and_escaped(hostile):
    recipe, _ = hostile
    result = run_cli("plan", str(recipe))
    assert result.returncode == 0, result.stderr
    no_raw_controls(result.stdout)
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["model", "tensor", "elements", "score", "s", "base p", "p", "why"]
    assert sorted(row[1] for row in rows[1:5]) == sorted(ESCAPED)
    assert all(len(row) == 8 for row in rows[1:5]), rows
    csv_result = run_cli("plan", str(recipe), "--csv")
    assert csv_result.returncode == 0, csv_result.stderr
    no_raw_controls(csv_result.stdout)
    assert len(csv_result.stdout.splitlines()) == 5
    for name in ESCAPED:
        assert name in csv_result.stdout


def test_notes_of_a_dry_run_escape_names(hostile):
    recipe, _ = hostile
    result = run_cli("merge", str(recipe), "--dry-run")
    assert result.returncode == 0, result.stderr
    no_raw_controls(result.stderr)
    assert "e.g. extra.[/x].\\x1b[2J.weight" in result.stderr


def test_verify_with_odd_paths_is_one_line_exit_2(tmp_path):
    for path in [tmp_path / "missing[v2]", tmp_path / "x\x1b[31m[/x]"]:
        result = run_cli("verify", str(path))
        assert result.returncode == 2, result.stderr
        line = one_line(result.stderr)
        assert line.startswith("error: ") and printable(path) in line, line
        no_raw_controls(result.stderr)


# ---------------------------------------------------------------- output to files, pipes and closed streams


def test_summary_and_dry_run_lines_never_wrap_when_piped(models, tmp_path):
    output = tmp_path / ("a-rather-long-output-folder-name-" * 4)
    recipe = write_recipe(tmp_path, basic_recipe(models, output))
    dry = run_cli("merge", str(recipe), "--dry-run")
    assert dry.returncode == 0 and one_line(dry.stderr).startswith("dry run: 9 tensors in 1 shard(s) to "), dry.stderr
    assert str(output) in dry.stderr
    merged = run_cli("merge", str(recipe), env={"COLUMNS": "80"})
    assert merged.returncode == 0
    assert one_line(merged.stderr).startswith(f"merged 9 tensors (116.0 KB) into {output} in ")


def test_methods_piped_is_a_whole_tab_separated_table():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "method\twhat it does\tTADrop enters\tparameters (default)"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:-1]}
    assert set(rows) == set(METHODS)
    for name, method in METHODS.items():
        params = ", ".join(f"{p.name}={p.default}" + ("*" if p.per_model else "") for p in method.params)
        assert rows[name] == [name, method.description, method.sparsifier or "-", params]


def test_plan_piped_keeps_long_tensor_names_whole(tmp_path):
    long_name = "model.layers.0." + "very_long_module_name_" * 6 + "weight"
    base = {long_name: torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    models = {
        "base": write_checkpoint(tmp_path / "base", base),
        "ft0": write_checkpoint(tmp_path / "ft0", fine_tune(base, 0)),
    }
    recipe = write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", method="ties", tadrop={}))
    result = run_cli("plan", str(recipe), env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split("\t")[1] == long_name


def _bash(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_merge_json_with_stdout_closed_is_published_and_exits_0(recipe):
    path, output = recipe
    result = _bash(f"'{sys.executable}' -m tadrop_cli merge '{path}' --json >&-")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (output / "model.safetensors").is_file()
    lines = result.stderr.splitlines()
    assert lines[0].startswith("note: the JSON summary was not printed (stdout is closed)"), result.stderr
    quiet = _bash(f"'{sys.executable}' -m tadrop_cli merge '{path}' -o '{output}2' -q >&-")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_read_only_commands_with_stdout_closed_exit_1_in_one_line(recipe):
    path, _ = recipe
    for command in ["methods", f"plan '{path}' --json", "--version"]:
        result = _bash(f"'{sys.executable}' -m tadrop_cli {command} >&-")
        assert result.returncode == 1, (command, result.stderr)
        assert one_line(result.stderr) == "error: stdout is closed: nothing was printed", result.stderr


def test_a_reader_that_stops_early_is_no_failure():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tadrop_cli", "methods"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before tadrop writes: its write meets a broken pipe
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, stderr
    assert stderr == ""


def test_stderr_closed_does_not_change_the_outcome(recipe):
    path, output = recipe
    result = _bash(f"'{sys.executable}' -m tadrop_cli merge '{path}' 2>&-")
    assert result.returncode == 0 and (output / "model.safetensors").is_file()
    result = _bash(f"'{sys.executable}' -m tadrop_cli merge '{path}' 2>&-")
    assert result.returncode == 2  # the output exists now: still bad input, said to nobody


# ---------------------------------------------------------------- help, usage


@pytest.mark.parametrize("command", [[], ["merge"], ["plan"], ["methods"], ["verify"]])
def test_dash_h_is_help_everywhere_and_flags_show_no_value(command):
    result = invoke(*command, "-h")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout
    assert "<bool>" not in result.stdout


def test_flag_given_a_value_is_refused_in_one_line(recipe):
    path, _ = recipe
    result = invoke("merge", path, "--overwrite", "true")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("error: OUT_DIR true: flags take no value"), result.stderr


def test_positional_out_dir_as_mergekit_takes_it(recipe, tmp_path):
    path, output = recipe
    result = invoke("merge", path, tmp_path / "positional", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "positional" / "model.safetensors").is_file() and not output.exists()
    same = invoke("merge", path, tmp_path / "same", "-o", tmp_path / "same/", "-q")
    assert same.exit_code == 0, same.stderr
    both = invoke("merge", path, tmp_path / "a", "-o", tmp_path / "b")
    assert both.exit_code == 2
    assert one_line(both.stderr) == (
        f"error: OUT_DIR {tmp_path / 'a'} and --output {tmp_path / 'b'} name different folders: give one of them"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["frob"], "error: No such command 'frob'."),
        (["merge", "--bogus"], "error: No such option: --bogus"),
        (["merge"], "error: Missing argument 'RECIPE'."),
        (["merge", "a", "b", "c"], "error: Got unexpected extra argument(s) (c)"),
        (["methods", "x\x1b[31m"], "error: Got unexpected extra argument(s) (x\\x1b[31m)"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr).startswith(message), result.stderr
    no_raw_controls(result.stderr)


def test_plan_refuses_two_formats(recipe):
    path, _ = recipe
    result = invoke("plan", path, "--json", "--csv")
    assert result.exit_code == 2 and one_line(result.stderr) == "error: --json and --csv: choose one format"
    assert result.stdout == ""


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("tadrop 0.1.0 (CPU kernels: "), result.stdout


# ---------------------------------------------------------------- progress


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, phase, total_tensors, total_bytes):
        self.calls.append(("start", phase, total_tensors, total_bytes))

    def part(self, nbytes):
        self.calls.append(("part", nbytes))

    def advance(self, nbytes):
        self.calls.append(("advance", nbytes))

    def finish(self):
        self.calls.append(("finish",))


def test_a_large_tensor_moves_the_bar_slice_by_slice(tmp_path):
    """A tensor of 3 slices reports each slice before the tensor is done; the bytes add up."""
    rows = 3 * tensor_merge.CHUNK_ELEMENTS // 1024
    base = {
        "big.weight": torch.randn(rows, 1024, generator=torch.Generator().manual_seed(0)),
        "small.bias": torch.zeros(8),
    }
    models = {
        "base": write_checkpoint(tmp_path / "base", base),
        "ft0": write_checkpoint(tmp_path / "ft0", fine_tune(base, 0)),
    }
    from tadrop_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", method="ties")))
    recorder = Recorder()
    run.run_merge(recipe, run.MergeOptions(), recorder)
    merging = recorder.calls[[c[0:2] for c in recorder.calls].index(("start", "merging")) + 1 :]
    big = rows * 1024 * 4
    assert merging[:4] == [("part", big // 3)] * 3 + [("advance", big)], merging


def _console_output(monkeypatch) -> io.StringIO:
    buffer = io.StringIO()
    console = cli.Console(file=buffer, force_terminal=True, width=120, highlight=False, markup=False)
    monkeypatch.setattr(cli, "err", console)
    return buffer


def test_bar_counts_slices_once_and_each_phase_is_drawn_once(monkeypatch):
    buffer = _console_output(monkeypatch)
    progress = cli.RichProgress()
    progress.start("scoring", 2, 200)
    progress.advance(100)
    progress.advance(100)
    progress.start("merging", 1, 300)
    progress.part(100)
    progress.part(100)
    assert progress._bar.tasks[0].completed == 200
    progress.advance(300)
    assert progress._bar.tasks[0].completed == 300 and len(progress._bar.tasks) == 1
    progress.finish()
    text = buffer.getvalue()
    assert text.rindex("scoring") < text.index("merging"), "the scoring bar is drawn again below the merging one"


# ---------------------------------------------------------------- interrupts: honest messages


def test_interrupt_while_scoring_says_no_shard_was_finished(tmp_path, models, monkeypatch):
    path = write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", method="ties", tadrop={}))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "build_plan", stop)
    result = invoke("merge", path, "-q")
    assert result.exit_code == 130
    assert one_line(result.stderr) == (
        "interrupted: nothing was published, and no shard was finished; run again to start over"
    )


def test_interrupt_after_two_shards_says_resume_keeps_them(tmp_path, models, monkeypatch):
    recipe = basic_recipe(models, tmp_path / "out")
    recipe["output"]["shard_size"] = 20000
    path = write_recipe(tmp_path, recipe)
    marked = []
    original = staging.StagingFolder.mark_complete

    def mark_then_stop(self, name):
        original(self, name)
        marked.append(name)
        if len(marked) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(staging.StagingFolder, "mark_complete", mark_then_stop)
    result = invoke("merge", path, "-q")
    assert result.exit_code == 130
    assert one_line(result.stderr) == (
        "interrupted: nothing was published; 2 finished shards kept: run again with --resume to continue from them"
    )


def test_interrupt_of_plan_says_only_interrupted(tmp_path, models, monkeypatch):
    path = write_recipe(tmp_path, basic_recipe(models, tmp_path / "out", method="ties", tadrop={}))
    monkeypatch.setattr(run, "build_plan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    result = invoke("plan", path)
    assert result.exit_code == 130 and one_line(result.stderr) == "interrupted"


# ---------------------------------------------------------------- real signals, at any moment


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tadrop_cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _catches(pid: int, number: int) -> bool:
    """Whether process `pid` has a handler for signal `number` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (number - 1) & 1)


def _spawn_interruptible(args: list) -> subprocess.Popen:
    """As from a terminal: SIGINT not ignored, even where these tests run in the background."""
    return _spawn(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_handlers_come_before_the_heavy_imports(recipe):
    """SIGTERM is caught (by tadrop: Python itself catches only SIGINT) before numpy, rich or
    typer are loaded: an interrupt during the imports that take a second ends cleanly."""
    path, _ = recipe
    proc = _spawn_interruptible(["merge", path, "-q"])
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert "_multiarray_umath" not in maps, "numpy was imported before the signal handlers were installed"
    assert proc.returncode == 130 and one_line(stderr) == "interrupted", (proc.returncode, stderr)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_at_any_moment_from_spawn_exits_130_in_one_line(recipe, sig):
    """Signals from the instant the process starts (while Python imports) until the merge runs.
    Only before tadrop's handlers are installed (the first ~0.1 s, mostly Python's own start) may
    the system's default end the process (the shell then shows 128 + the signal's number)."""
    path, output = recipe
    number = getattr(signal, sig)
    for delay in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
        proc = _spawn_interruptible(["merge", path, "-q"])
        time.sleep(delay)
        installed = _catches(proc.pid, signal.SIGTERM)
        proc.send_signal(number)
        _, stderr = proc.communicate(timeout=60)
        if not installed:  # Python's own start, or the few lines before tadrop's install(): the system's default
            continue
        assert "Traceback" not in stderr, (delay, stderr)
        if proc.returncode == 0:  # the merge (~1 s) was done and gone before the signal came
            assert stderr == "" and (output / "model.safetensors").is_file(), (delay, stderr)
            shutil.rmtree(output)
            continue
        assert proc.returncode == 130, (delay, proc.returncode, stderr)
        line = one_line(stderr)
        assert line.startswith("interrupted"), (delay, stderr)
        if output.exists():  # the signal came once the output was in place: said so, never "nothing was published"
            assert "complete" in line and "nothing was published" not in line, (delay, line)
            shutil.rmtree(output)


SLOW_WRAPPER = """\
import sys, time
sys.path.insert(0, {repo!r})
sys.argv = ["tadrop", *sys.argv[1:]]
from tadrop_cli import run
merge_tensors = run.merge_tensors
def slow(*args, **kwargs):
    for merged in merge_tensors(*args, **kwargs):  # each tensor of a shard, whether merged alone or in a batch
        time.sleep(0.4)
        yield merged
run.merge_tensors = slow
from tadrop_cli.__main__ import main
main()
"""


def _run_in_pty(args: list[str], tmp_path: Path, signal_after: str, sig: int = signal.SIGINT) -> tuple[int, str]:
    """Run tadrop (each tensor slowed) with stdout and stderr on a pseudo-terminal; once `signal_after`
    appears on it, send `sig`. Returns (exit status, all it printed)."""
    script = tmp_path / "slow_tadrop.py"
    script.write_text(SLOW_WRAPPER.format(repo=str(REPO)))
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=child_fd,
        stderr=child_fd,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(child_fd)
    seen, sent, deadline = b"", False, time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if not sent and signal_after.encode() in seen:
            proc.send_signal(sig)
            sent = True
        if proc.poll() is not None and not ready:
            break
    os.close(main_fd)
    return proc.wait(timeout=60), seen.decode(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_under_a_terminal_lands_below_the_stopped_bar(recipe, tmp_path, sig):
    path, output = recipe
    status, screen = _run_in_pty(["merge", path], tmp_path, signal_after="1/9 tensors", sig=sig)
    assert status == 130, screen
    assert "Traceback" not in screen
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # colours, cursor moves
    message = screen.index("interrupted: nothing was published")
    assert screen[message - 1] == "\n", repr(screen[message - 80 : message + 20])
    assert "merging" not in screen[message:], "the bar was drawn again after the message"
    assert screen.rstrip().endswith("run again with --resume to continue from them") or "no shard" in screen[message:]
    assert not output.exists()


def test_a_blocking_open_by_python_is_interrupted(tmp_path):
    """Python's own blocking open (of a FIFO nobody writes) ends on SIGINT: the handler raises."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    script = tmp_path / "hang.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from tadrop_cli import interrupts\n"
        "interrupts.install()\n"
        "with interrupts.raising():\n"
        "    try:\n"
        "        print('opening', flush=True)\n"
        f"        open({str(fifo)!r}, 'rb')\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.readline() == "opening\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert (proc.returncode, stdout, stderr) == (0, "interrupted\n", "")


def test_a_fifo_named_by_an_index_never_hangs_past_a_signal(tmp_path, models):
    """Refused as bad input, or, where it is opened, ended by SIGINT and then by SIGTERM. (safetensors'
    safe_open holds the GIL and retries an interrupted open: on a FIFO no handler would ever run,
    so checkpoint.py refuses what is not a regular file before opening it.)"""
    folder = tmp_path / "fifo_model"
    folder.mkdir()
    os.mkfifo(folder / "model-00001-of-00001.safetensors")
    weight_map = {"model.embed.weight": "model-00001-of-00001.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    recipe = basic_recipe({**models, "ft1": folder}, tmp_path / "out")
    path = write_recipe(tmp_path, recipe)
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = _spawn_interruptible(["merge", path, "-q"])
        try:
            proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        try:
            _, stderr = proc.communicate(timeout=10)
        finally:
            proc.kill()
        assert proc.returncode in (2, 130), stderr
        assert "Traceback" not in stderr
        one_line(stderr)


def test_first_signal_in_a_command_raises_and_a_second_stops_at_once(monkeypatch):
    """Inside a command's body the first signal becomes KeyboardInterrupt (cleanup runs); one more,
    during that cleanup, and everywhere outside a body, stops at once."""
    from tadrop_cli import interrupts

    stopped = []
    monkeypatch.setattr(interrupts, "stop_now", lambda *args: stopped.append(args))
    interrupts._on_signal(signal.SIGINT, None)  # outside a command's body: during the imports, say
    assert stopped == [()]
    with interrupts.raising():
        with pytest.raises(KeyboardInterrupt):
            interrupts._on_signal(signal.SIGTERM, None)
        interrupts._on_signal(signal.SIGINT, None)
    assert stopped == [(), ()]
    with interrupts.raising():  # the next command starts afresh
        with pytest.raises(KeyboardInterrupt):
            interrupts._on_signal(signal.SIGINT, None)


# ---------------------------------------------------------------- an interrupt once the output is published

_SIGNAL_AFTER = """
import os, signal, sys
from tadrop_cli import interrupts
interrupts.install()
from tadrop_cli import cli, run, staging
module, name = {where!r}
owner = {{"staging": staging.StagingFolder, "cli": cli, "run": run}}[module]
original = getattr(owner, name)
def then_signal(*args, **kwargs):
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return result
setattr(owner, name, then_signal)
sys.argv = ["tadrop", "merge", {recipe!r}]
cli.main()
"""


@pytest.mark.parametrize(
    "where",
    [("staging", "_move_in"), ("run", "_peak_memory"), ("cli", "merged_line")],
    ids=["right after the rename", "while the engine writes its summary", "while printing the summary"],
)
def test_an_interrupt_after_publishing_says_the_output_is_complete(recipe, where):
    recipe_path, output = recipe
    script = _SIGNAL_AFTER.format(where=where, recipe=str(recipe_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 130, result.stderr
    line = one_line(result.stderr)
    assert "nothing was published" not in line and "--resume" not in line, line
    assert "complete" in line and str(output) in line, line
    assert (output / "model.safetensors").is_file()
    assert run_cli("verify", str(output)).returncode == 0
    assert not list(output.parent.glob(f".{output.name}.tadrop-*")), list(output.parent.iterdir())
