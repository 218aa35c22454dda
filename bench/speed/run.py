#!/usr/bin/env python3
"""Speed benchmark: tadrop versus mergekit on equivalent recipes.

Every merge runs as a child process and is measured as a whole (interpreter
start, imports, reading, merging, writing): wall time, user+sys CPU time and
peak RSS, all from os.wait4() on that child. Tools alternate within a case
(mergekit, tadrop off, tadrop on, mergekit, ...), each case is repeated
--repeats times, and medians are reported.

    python bench/speed/run.py --quick --tools mergekit     # tiny smoke run
    python bench/speed/run.py --sizes 168m --n-models 4    # the main case
    python bench/speed/run.py --device cuda ...            # both tools on the GPU (bench/speed/gpu.sh)

What it does, per case (size, N, method):
  * makes or reuses synthetic checkpoints (make_checkpoints.py, bench/.cache/);
  * writes one mergekit recipe (`models:` form) and, for tadrop, the same
    recipe plus `seed: 0` and, for TADrop-on runs, `tadrop: {enabled: true}`;
  * runs `mergekit-yaml` from its own venv (bench/.venv-mergekit, created on
    first use) and `tadrop merge ... --json`;
  * measures the floor: reading all input bytes from the page cache in a child;
  * cross-checks the outputs of the non-random methods (compare_outputs.py),
    also against a mergekit run with `dtype: float32` (unless --no-fp32-check);
  * writes a markdown report (--out, default docs/speed.md) and the raw
    per-run numbers as JSON under bench/.cache/results/.

This runner imports nothing heavy on purpose: Linux carries a parent's RSS
into its children's ru_maxrss, so the runner must stay small (its share is
shown as the launcher's RSS floor in the report).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "bench" / ".cache"
MK_VENV = REPO / "bench" / ".venv-mergekit"
TORCH_PIN = "torch==2.13.0"
ALL_METHODS = ("task_arithmetic", "ties", "dare_ties", "della", "consensus_ties", "tsv_m", "iso_c", "iso_cts")
DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties")
MERGEKIT_METHODS = {"task_arithmetic", "ties", "dare_ties", "della"}  # the rest are tadrop's own
TOPK_METHODS = {"ties": 0.5}  # magnitude top-k methods of the recipes, and their density
NO_TADROP = {"task_arithmetic", "linear", "iso_c"}  # nothing is sparsified: TADrop-on is refused (exit 2)
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
SIZES = ("40m", "168m", "500m", "1b")  # must match make_checkpoints.PRESETS
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- children


HZ = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy (all cores, /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / HZ


def others_load(window: float = 2.0) -> float:
    """Cores busy over a short window (the runner itself is asleep meanwhile)."""
    b0, t0 = cpu_busy_s(), time.perf_counter()
    time.sleep(window)
    return (cpu_busy_s() - b0) / (time.perf_counter() - t0)


def wait_idle(max_s: float, threshold: float) -> tuple[float, float]:
    """Wait (at most max_s) until other processes use fewer than `threshold` cores."""
    t0 = time.perf_counter()
    load = others_load()
    announced = False
    while load > threshold and time.perf_counter() - t0 < max_s:
        if not announced:
            log(f"  machine busy ({load:.2f} cores in use by others); waiting up to {max_s:.0f} s")
            announced = True
        time.sleep(3)
        load = others_load()
    return time.perf_counter() - t0, load


def run_child(
    cmd: list[str],
    stdout_path: Path | None = None,
    stderr_path: Path | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
) -> dict:
    """Run cmd as a child; return wall, cpu (user+sys) and peak RSS from wait4.

    Also the CPU time that the rest of the machine used meanwhile (`others_cores`,
    in cores on average), to tell a run slowed by other work from a slow tool.
    """
    e = dict(os.environ)
    e.update(CHILD_ENV)
    if env:
        e.update(env)
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
    try:
        b0 = cpu_busy_s()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=e, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy = cpu_busy_s() - b0
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        for f in (out, err):
            if hasattr(f, "close"):
                f.close()
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "others_cores": max(0.0, busy - cpu) / wall if wall > 0 else 0.0,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "cpu_s": cpu,
        "maxrss_mb": ru.ru_maxrss / 1024.0,  # KiB on Linux
        "majflt": ru.ru_majflt,
        "inblock": ru.ru_inblock,
        "oublock": ru.ru_oublock,
    }


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(CHILD_ENV)
    return subprocess.run(cmd, capture_output=True, text=True, env=e, **kw)


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.exists() else 0


# ---------------------------------------------------------------- mergekit venv


def mk_bin(name: str) -> Path:
    return MK_VENV / "bin" / name


def mergekit_cmd(args) -> list[str]:
    """How to call mergekit-yaml: --mergekit-cmd, or the one in bench/.venv-mergekit."""
    return shlex.split(args.mergekit_cmd) if args.mergekit_cmd else [str(mk_bin("mergekit-yaml"))]


def mergekit_ok() -> bool:
    exe = mk_bin("mergekit-yaml")
    if not exe.exists():
        return False
    r = sh([str(exe), "--help"])
    return r.returncode == 0 and "CONFIG_FILE" in r.stdout


def ensure_mergekit(python: str) -> str:
    """Create bench/.venv-mergekit with mergekit from PyPI; return its version."""
    if not mergekit_ok():
        log(f"setting up {MK_VENV} (mergekit from PyPI, {TORCH_PIN} pinned)")
        if not (MK_VENV / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(MK_VENV)], check=True)
        pip = [str(mk_bin("python")), "-m", "pip", "install", "-q"]
        # torch first, from the local CPU wheel: a bare `torch` requirement
        # would otherwise pull the CUDA build and its GBs of nvidia packages.
        subprocess.run(pip + [TORCH_PIN], check=True)
        cons = MK_VENV / "constraints.txt"
        cons.write_text(TORCH_PIN + "\n")
        r = subprocess.run(pip + ["-c", str(cons), "mergekit"])
        if r.returncode != 0:
            # mergekit's requirements could not be met with this torch: install
            # it without deps, then every requirement but torch.
            log("pip could not resolve mergekit with the pinned torch; retrying with --no-deps")
            subprocess.run(pip + ["--no-deps", "mergekit"], check=True)
            reqs = sh(
                [
                    str(mk_bin("python")),
                    "-c",
                    "import importlib.metadata as m\n"
                    "for r in m.requires('mergekit') or []:\n"
                    "    if 'extra ==' in r: continue\n"
                    "    n = r.split(';')[0].strip()\n"
                    "    if n.lower().startswith('torch') and not n.lower().startswith('torchvision'):"
                    " continue\n"
                    "    print(n)\n",
                ]
            ).stdout.split("\n")
            reqs = [r for r in reqs if r.strip()]
            subprocess.run(pip + ["-c", str(cons)] + reqs, check=True)
        if not mergekit_ok():
            raise SystemExit("mergekit-yaml --help does not work in " + str(MK_VENV))
    return sh(
        [
            str(mk_bin("python")),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'),"
            " m.version('transformers'))",
        ]
    ).stdout.strip()


# ---------------------------------------------------------------- tadrop


def tadrop_cmd(args) -> list[str] | None:
    if args.tadrop_cmd:
        return shlex.split(args.tadrop_cmd)
    cand = Path(sys.executable).parent / "tadrop"
    if cand.exists():
        return [str(cand)]
    w = shutil.which("tadrop")
    return [w] if w else None


def tadrop_version(cmd: list[str]) -> str:
    r = sh(cmd + ["--version"])
    v = (r.stdout or r.stderr).strip().splitlines()
    return v[-1] if r.returncode == 0 and v else "unknown"


# ---------------------------------------------------------------- recipes


def recipe_text(
    method: str,
    base: Path,
    fts: list[Path],
    *,
    dtype: str,
    out_dtype: str | None = None,
    tadrop: str | None = None,
    seed: int | None = None,
) -> str:
    """A mergekit `models:` recipe; tadrop takes it unchanged (plus its extras)."""
    n = len(fts)
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for ft in fts:
        if method == "task_arithmetic":
            params = {"weight": round(1.0 / n, 6)}
        elif method in ("tsv_m", "iso_c", "iso_cts"):  # rank hosts: their default budget (1/T)
            params = {"weight": 1.0}
        else:  # ties, dare_ties, della, consensus_ties
            params = {"density": 0.5, "weight": 0.5}
        ps = ", ".join(f"{k}: {v}" for k, v in params.items())
        lines += [f"  - model: {ft}", f"    parameters: {{{ps}}}"]
    if method in ("task_arithmetic", "tsv_m", "iso_c", "iso_cts"):
        lines += ["parameters:", "  lambda: 1.0"]
    else:
        lines += ["parameters:", "  normalize: true"]
    lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    if seed is not None:
        lines.append(f"seed: {seed}")
    if tadrop == "on":
        lines += ["tadrop:", "  enabled: true"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- variants


class Variant:
    def __init__(self, key: str, tool: str, flag: str, dtype: str, out_dtype: str | None = None, timed: bool = True):
        self.key, self.tool, self.flag = key, tool, flag
        self.dtype, self.out_dtype, self.timed = dtype, out_dtype, timed

    @property
    def label(self) -> str:
        if self.tool == "mergekit":
            return f"mergekit ({self.dtype})"
        return "tadrop"


def variants_for(args) -> list[Variant]:
    vs: list[Variant] = []
    tools = args.tools
    if "mergekit" in tools:
        vs.append(Variant("mergekit", "mergekit", "-", args.mergekit_dtype))
    if "tadrop" in tools:
        for flag in args.tadrop:
            vs.append(Variant(f"tadrop-{flag}", "tadrop", flag, args.mergekit_dtype))
    return vs


def device_flags(args) -> tuple[list[str], list[str]]:
    """The device arguments of mergekit-yaml and of tadrop merge."""
    if args.device == "cuda":
        return ["--cuda"], ["--device", "cuda"]
    return ["--no-cuda"], []


def build_cmd(v: Variant, recipe: Path, out: Path, args, tad: list[str] | None) -> list[str]:
    mk_device, tadrop_device = device_flags(args)
    if v.tool == "mergekit":
        cmd = mergekit_cmd(args) + [
            str(recipe),
            str(out),
            *mk_device,
            "--lazy-unpickle",
            "--no-copy-tokenizer",
            "--quiet",
            "--random-seed",
            str(args.seed),
        ]
        return cmd + shlex.split(args.mergekit_args)
    assert tad is not None
    return (
        tad
        + ["merge", str(recipe), "--output", str(out), "--overwrite", "--quiet", "--json", *tadrop_device]
        + shlex.split(args.tadrop_args)
    )


# ---------------------------------------------------------------- floor


READ_ALL = r"""
import sys, time
buf = bytearray(16 << 20)
mv = memoryview(buf)
n = 0
t0 = time.perf_counter()
for p in sys.argv[1:]:
    with open(p, 'rb', buffering=0) as f:
        while True:
            k = f.readinto(mv)
            if not k:
                break
            n += k
print(n, time.perf_counter() - t0)
"""


def input_files(base: Path, fts: list[Path]) -> list[Path]:
    return [f for d in [base, *fts] for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]


def measure_floor(files: list[Path], py: str) -> dict:
    sh([py, "-c", READ_ALL, *map(str, files)])  # warm the page cache
    best = None
    for _ in range(3):
        r = sh([py, "-c", READ_ALL, *map(str, files)])
        nbytes, secs = r.stdout.split()
        secs = float(secs)
        best = secs if best is None else min(best, secs)
    return {"read_bytes": int(nbytes), "read_s": best}


def launcher_rss() -> float:
    return run_child(["/bin/true"])["maxrss_mb"]


# ---------------------------------------------------------------- machine


def machine_info(py: str, device: str = "cpu") -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    torch_v = sh([py, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"]).stdout.split()
    gpu = None
    if device == "cuda":
        gpu = sh(
            [
                py,
                "-c",
                "import torch; p = torch.cuda.get_device_properties(0); "
                "print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}')",
            ]
        ).stdout.strip()
    commit = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = bool(sh(["git", "-C", str(REPO), "status", "--porcelain", "tadrop_cli"]).stdout.strip())
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_v[0] if torch_v else "unknown",
        "torch_threads": torch_v[1] if len(torch_v) > 1 else "?",
        "commit": commit + ("+dirty tadrop_cli" if dirty else ""),
        "gpu": gpu,
    }


# ---------------------------------------------------------------- main loop


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_case(size: str, n: int, method: str, args, tad, py: str, results: dict) -> None:
    case_id = f"{size}-n{n}-{method}"
    log(f"case {case_id}")
    r = sh(
        [py, str(HERE / "make_checkpoints.py"), "--preset", size, "--n-models", str(n), "--seed", str(args.ckpt_seed)]
    )
    if r.returncode != 0:
        raise SystemExit("make_checkpoints failed:\n" + r.stderr)
    if r.stderr.strip():
        log(r.stderr.strip())
    paths = [Path(p) for p in r.stdout.split()]
    base, fts = paths[0], paths[1:]
    files = input_files(base, fts)
    floor_key = f"{size}-n{n}"
    if floor_key not in results["floors"]:
        results["floors"][floor_key] = measure_floor(files, py)
        log(f"floor {floor_key}: {results['floors'][floor_key]}")
    else:  # keep the page cache warm for this case
        sh([py, "-c", READ_ALL, *map(str, files)])

    work = CACHE / "speed" / case_id
    work.mkdir(parents=True, exist_ok=True)
    variants = [
        v
        for v in variants_for(args)
        if not (v.flag == "on" and method in NO_TADROP) and (v.tool != "mergekit" or method in MERGEKIT_METHODS)
    ]
    recipes = {}
    for v in variants:
        if v.tool == "mergekit":
            txt = recipe_text(method, base, fts, dtype=v.dtype, out_dtype=v.out_dtype)
        else:
            txt = recipe_text(method, base, fts, dtype=v.dtype, seed=args.seed, tadrop="on" if v.flag == "on" else None)
        rp = work / f"{v.key}.yaml"
        rp.write_text(txt)
        recipes[v.key] = rp

    runs = results["runs"]
    outs = {v.key: work / f"out-{v.key}" for v in variants}
    for rep in range(args.repeats):
        for v in variants:
            out = outs[v.key]
            if out.exists():
                shutil.rmtree(out)
            cmd = build_cmd(v, recipes[v.key], out, args, tad)
            so, se = work / f"{v.key}.stdout", work / f"{v.key}.stderr"
            waited, before = wait_idle(args.wait_idle, args.idle_cores) if args.wait_idle > 0 else (0.0, None)
            m = run_child(cmd, so, se)
            m["waited_s"], m["others_before"] = waited, before
            m.update(
                {
                    "size": size,
                    "n": n,
                    "method": method,
                    "variant": v.key,
                    "tool": v.tool,
                    "flag": v.flag,
                    "dtype": v.dtype,
                    "repeat": rep,
                    "timed": True,
                    "cmd": " ".join(shlex.quote(c) for c in cmd),
                    "written_bytes": dir_bytes(out),
                }
            )
            if v.tool == "tadrop":
                try:
                    m["summary"] = json.loads(so.read_text())
                except (OSError, ValueError):
                    m["summary"] = None
            if m["rc"] != 0:
                m["error"] = tail(se)
                log(f"  {v.key} FAILED rc={m['rc']}: {cmd}\n{m['error']}")
            else:
                log(
                    f"  {v.key} rep {rep}: wall {m['wall_s']:.2f} s, cpu {m['cpu_s']:.2f} s, "
                    f"rss {m['maxrss_mb']:.0f} MB, others {m['others_cores']:.2f} cores"
                )
            runs.append(m)

    # correctness cross-check (non-random methods only)
    if args.check and method not in RANDOM_METHODS and method in MERGEKIT_METHODS:
        checks = results["checks"]
        mk_out = outs.get("mergekit")
        off_out = outs.get("tadrop-off")
        pairs = []
        if mk_out and off_out:
            pairs.append(("tadrop off vs mergekit (" + args.mergekit_dtype + ")", off_out, mk_out))
        if args.fp32_check and "mergekit" in args.tools and args.mergekit_dtype != "float32":
            v32 = Variant("mergekit-fp32", "mergekit", "-", "float32", out_dtype="bfloat16")
            rp = work / "mergekit-fp32.yaml"
            rp.write_text(recipe_text(method, base, fts, dtype="float32", out_dtype="bfloat16"))
            out32 = work / "out-mergekit-fp32"
            if out32.exists():
                shutil.rmtree(out32)
            cmd = build_cmd(v32, rp, out32, args, tad)
            m = run_child(cmd, work / "mergekit-fp32.stdout", work / "mergekit-fp32.stderr")
            m.update(
                {
                    "size": size,
                    "n": n,
                    "method": method,
                    "variant": v32.key,
                    "tool": "mergekit",
                    "flag": "-",
                    "dtype": "float32",
                    "repeat": 0,
                    "timed": False,
                    "cmd": " ".join(shlex.quote(c) for c in cmd),
                    "written_bytes": dir_bytes(out32),
                }
            )
            if m["rc"] != 0:
                m["error"] = tail(work / "mergekit-fp32.stderr")
                log(f"  mergekit-fp32 FAILED rc={m['rc']}\n{m['error']}")
            else:
                log(f"  mergekit-fp32 (check run): wall {m['wall_s']:.2f} s, rss {m['maxrss_mb']:.0f} MB")
            runs.append(m)
            if m["rc"] == 0:
                if off_out:
                    pairs.append(("tadrop off vs mergekit (float32 compute, bf16 out)", off_out, out32, True))
                if mk_out:
                    pairs.append((f"mergekit ({args.mergekit_dtype}) vs mergekit (float32)", mk_out, out32, False))
        for label, a, b, *ties in pairs:
            if not (a.exists() and b.exists()):
                continue
            cmd = [py, str(HERE / "compare_outputs.py"), str(a), str(b)]
            if ties and ties[0] and method in TOPK_METHODS:
                # both sides compute in float32: differences should sit only at top-k ties
                cmd += ["--density", str(TOPK_METHODS[method]), "--inputs", str(base), *map(str, fts)]
            r = sh(cmd)
            if r.returncode != 0:
                log(f"  compare failed: {r.stderr[-2000:]}")
                continue
            c = json.loads(r.stdout)
            c.update({"size": size, "n": n, "method": method, "pair": label})
            checks.append(c)
            log(
                f"  check {label}: max|diff| {c['max_abs_diff']:.3g}, "
                f"differing {100 * c['frac_differ']:.3f}%, >1 bf16 ulp {100 * c['frac_over_1ulp']:.4f}%"
                + (
                    f", differing outside top-k ties {100 * c['frac_differ_outside_ties']:.4f}%"
                    if "frac_differ_outside_ties" in c
                    else ""
                )
            )

    if not args.keep_outputs:
        for d in work.glob("out-*"):
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- report


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def summarize(results: dict) -> list[dict]:
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for m in results["runs"]:
        groups.setdefault((m["size"], m["n"], m["method"], m["variant"]), []).append(m)
    for (size, n, method, variant), ms in groups.items():
        ok = [m for m in ms if m["rc"] == 0]
        rows.append(
            {
                "size": size,
                "n": n,
                "method": method,
                "variant": variant,
                "tool": ms[0]["tool"],
                "flag": ms[0]["flag"],
                "dtype": ms[0]["dtype"],
                "timed": ms[0]["timed"],
                "runs": len(ms),
                "ok": len(ok),
                "wall": med([m["wall_s"] for m in ok]),
                "cpu": med([m["cpu_s"] for m in ok]),
                "rss": med([m["maxrss_mb"] for m in ok]),
                "gpu_mb": med([(m.get("summary") or {}).get("peak_gpu_bytes", 0) / 2**20 or None for m in ok]),
                "others": med([m.get("others_cores") for m in ok]),
                "wall_min": min((m["wall_s"] for m in ok), default=None),
                "wall_max": max((m["wall_s"] for m in ok), default=None),
                "written": med([m["written_bytes"] for m in ok]),
                "errors": [m.get("error", "") for m in ms if m["rc"] != 0],
                "rcs": sorted({m["rc"] for m in ms if m["rc"] != 0}),
                "cmd": ms[0]["cmd"],
            }
        )
    # ratios against mergekit (same dtype as the timed mergekit runs) and TADrop on/off
    idx = {(r["size"], r["n"], r["method"], r["variant"]): r for r in rows}
    for r in rows:
        mk = idx.get((r["size"], r["n"], r["method"], "mergekit"))
        r["speedup"] = (mk["wall"] / r["wall"]) if mk and mk["wall"] and r["wall"] else None
        r["speedup_cpu"] = (mk["cpu"] / r["cpu"]) if mk and mk["cpu"] and r["cpu"] else None
        r["mem_ratio"] = (mk["rss"] / r["rss"]) if mk and mk["rss"] and r["rss"] else None
        off = idx.get((r["size"], r["n"], r["method"], "tadrop-off"))
        r["on_off"] = (
            (r["wall"] / off["wall"]) if r["variant"] == "tadrop-on" and off and off["wall"] and r["wall"] else None
        )
    order = {"mergekit": 0, "tadrop-off": 1, "tadrop-on": 2, "mergekit-fp32": 3}
    size_order = {s: i for i, s in enumerate(SIZES)}
    rows.sort(
        key=lambda r: (
            size_order.get(r["size"], 9),
            r["n"],
            ALL_METHODS.index(r["method"]) if r["method"] in ALL_METHODS else 9,
            order.get(r["variant"], 9),
        )
    )
    return rows


def write_report(path: Path, results: dict, args) -> None:
    rows = summarize(results)
    mi = results["machine"]
    L: list[str] = []
    L.append("# Speed: tadrop versus mergekit")
    L.append("")
    L.append(
        "Generated by `bench/speed/run.py`; numbers below are from the run recorded here. "
        "Re-run with the command shown to refresh this page."
    )
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"- Date: {mi['date']}")
    gpu_text = f"GPU {mi['gpu']} (both tools run on it: `--device cuda` / `--cuda`)" if mi.get("gpu") else "no GPU"
    L.append(
        f"- Machine: {mi['nproc']} CPUs ({mi['cpu']}), {mi['ram_gib']} GiB RAM, Linux {mi['kernel']}, "
        f"{gpu_text}; the machine may be shared with other work, so expect some noise "
        f"(1-minute load average {results['load'][0]} at start, {results.get('load_end', ['?'])[0]} at end)."
    )
    L.append(
        f"- tadrop: {results.get('tadrop_version', 'not run')} (repo commit {mi['commit']}), "
        f"Python {mi['python']}, torch {mi['torch']} ({mi['torch_threads']} threads)"
    )
    L.append(
        f"- mergekit: {results.get('mergekit_version', 'not run')} (mergekit, torch, transformers), run as "
        f"`{' '.join(mergekit_cmd(args))}`"
    )
    L.append(f"- Command: `{results['command']}`")
    L.append(f"- Repeats: {args.repeats} per variant, tools alternating within each repeat; the table shows medians.")
    L.append("")
    L.append(
        "Checkpoints are synthetic Llama-shaped models (`bench/speed/make_checkpoints.py`): one base "
        "and N fine-tunes, bfloat16, sharded safetensors of ~250 MB, with per-tensor delta "
        "distributions (dense Gaussian, heavy-tailed Student-t, or sparse with a few large "
        "entries). Sizes: 40m = 42.1M parameters, 168m = 168.6M, 500m = 501.8M, 1b = 1012.0M."
    )
    L.append("")
    L.append(
        "Recipes (mergekit's `models:` form; tadrop reads the same file): task_arithmetic with "
        "weight 1/N each and lambda 1; ties with density 0.5, weight 0.5 each, normalize true; "
        f"dare_ties with density 0.5, weight 0.5 each, normalize true. `dtype: {args.mergekit_dtype}`. "
        "mergekit computes in `dtype`; tadrop computes in float32 and writes bfloat16. "
        "tadrop's copy adds `seed: 0`, and for the TADrop-on rows `tadrop: {enabled: true}`. "
        "task_arithmetic sparsifies nothing, so it has no TADrop-on row (tadrop refuses that "
        "recipe with exit 2). The newer hosts: della and consensus_ties like ties (density 0.5, "
        "weight 0.5, normalize true); tsv_m, iso_c and iso_cts with weight 1 and lambda 1 at their "
        "default rank budget (1/N of the rank per model); only della also runs in mergekit, and "
        "iso_c has no budget, so no TADrop-on row."
    )
    L.append("")
    L.append("Commands (one child process each, timed as a whole, from process start to exit):")
    L.append("")
    L.append("```")
    mk_device, tadrop_device = device_flags(args)
    L.append(
        f"mergekit-yaml RECIPE OUT {' '.join(mk_device)} --lazy-unpickle --no-copy-tokenizer --quiet --random-seed 0"
        + (f" {args.mergekit_args}" if args.mergekit_args else "")
    )
    L.append(
        " ".join(["tadrop merge RECIPE --output OUT --overwrite --quiet --json", *tadrop_device])
        + (f" {args.tadrop_args}" if args.tadrop_args else "")
    )
    L.append("```")
    L.append("")
    L.append(
        "Wall time is the child's elapsed time; CPU is its user+sys time; peak RSS is "
        "`ru_maxrss` from `os.wait4` (it includes the launcher's "
        f"{results['launcher_rss_mb']:.0f} MB, which Linux carries into every child). "
        "Outputs go to the page cache; tadrop flushes its output to disk (fsync) before it exits, "
        "and that time is counted; mergekit does not flush. "
        "Inputs are in the page cache (warmed before each case). "
        "`others' load` is the CPU time the rest of the machine used during the run, in cores "
        f"(median; this machine has {mi['nproc']}): where it is well above 0, the wall times are "
        "inflated by other work and the CPU times are the better guide. Before each run the "
        f"runner waits (up to {args.wait_idle:.0f} s) for other work to use under "
        f"{args.idle_cores} cores."
    )
    L.append("")
    L.append("## Results")
    L.append("")
    L.append(
        "`x vs mergekit` = mergekit's median wall time / this row's (above 1: faster than mergekit); "
        "`CPU x vs mergekit` = the same for CPU time; "
        "`mem vs mergekit` = mergekit's peak RSS / this row's; `on/off` = TADrop-on wall / "
        "TADrop-off wall. The floor is the time to read every input byte once from the page cache "
        "in a child process (best of 3): no merge can beat it."
    )
    L.append("")
    gpu_col = bool(mi.get("gpu"))  # tadrop's peak GPU memory (torch.cuda.max_memory_allocated), from its --json
    L.append(
        "| size | N | method | tool | tadrop | wall s (median) | CPU s | peak RSS MB | "
        + ("peak GPU MB | " if gpu_col else "")
        + "x vs mergekit "
        "| CPU x vs mergekit | mem vs mergekit | on/off | read floor s | read GB | written GB | others' load | runs |"
    )
    L.append("|---" * (17 + gpu_col) + "|")
    for r in rows:
        fl = results["floors"].get(f"{r['size']}-n{r['n']}", {})
        tool = "mergekit" if r["tool"] == "mergekit" else "tadrop"
        if r["tool"] == "mergekit":
            tool += f" ({r['dtype']})" + ("" if r["timed"] else " †")
        if r["ok"] == 0:
            L.append(
                f"| {r['size']} | {r['n']} | {r['method']} | {tool} | {r['flag']} | "
                f"FAILED (exit {', '.join(map(str, r['rcs']))}) | | | "
                + ("| " if gpu_col else "")
                + f"| | | | {fmt(fl.get('read_s'))} | "
                f"{fmt(fl.get('read_bytes', 0) / 1e9, '.2f')} | | | 0/{r['runs']} |"
            )
            continue
        spread = f" ({r['wall_min']:.1f}–{r['wall_max']:.1f})" if r["ok"] > 1 else ""
        L.append(
            f"| {r['size']} | {r['n']} | {r['method']} | {tool} | {r['flag']} | {fmt(r['wall'])}{spread} | "
            f"{fmt(r['cpu'], '.1f')} | {fmt(r['rss'], '.0f')} | "
            + (f"{fmt(r['gpu_mb'], '.0f')} | " if gpu_col else "")
            + f"{fmt(r['speedup'], '.2f') if r['variant'] != 'mergekit' else '1'} | "
            f"{fmt(r['speedup_cpu'], '.2f') if r['variant'] != 'mergekit' else '1'} | "
            f"{fmt(r['mem_ratio'], '.2f') if r['variant'] != 'mergekit' else '1'} | "
            f"{fmt(r['on_off'], '.2f', '')} | {fmt(fl.get('read_s'))} | {fmt(fl.get('read_bytes', 0) / 1e9)} | "
            f"{fmt((r['written'] or 0) / 1e9)} | {fmt(r['others'])} | {r['ok']}/{r['runs']} |"
        )
    if any(not r["timed"] for r in rows):
        L.append("")
        L.append(
            "† one untimed-in-the-comparison run with `dtype: float32, out_dtype: bfloat16`, made for "
            "the cross-check below (float32 compute, like tadrop's)."
        )
    if results["checks"]:
        L.append("")
        L.append("## Cross-check of outputs (non-random methods)")
        L.append("")
        L.append(
            "Every tensor of the two outputs, compared in float32. `> 1 ulp` = share of entries "
            "differing by more than one bfloat16 spacing, i.e. more than one rounding of the output "
            "explains. For TIES, a top-k keeps `int(density * n)` entries of largest |delta|; the "
            "bfloat16 inputs make many deltas exactly equal, and which of the entries tied at the "
            "threshold a top-k keeps is arbitrary (mergekit uses an unstable argsort). The column "
            "`differing outside top-k ties` leaves out entries where some fine-tune's |delta| equals "
            "its tensor's threshold: 0 there means the two merges agree everywhere the result is "
            "determined. mergekit with `dtype: bfloat16` computes the deltas and their sums in "
            "bfloat16, so it differs from any float32 computation by more than output rounding."
        )
        L.append("")
        L.append(
            "| size | N | method | pair | max abs diff | mean abs diff | entries differing | > 1 ulp "
            "| differing outside top-k ties (max diff there) | worst tensor |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in results["checks"]:
            outside = (
                f"{100 * c['frac_differ_outside_ties']:.4f}% ({c['max_abs_diff_outside_ties']:.3g})"
                if "frac_differ_outside_ties" in c
                else "–"
            )
            L.append(
                f"| {c['size']} | {c['n']} | {c['method']} | {c['pair']} | {c['max_abs_diff']:.3g} | "
                f"{c['mean_abs_diff']:.3g} | {100 * c['frac_differ']:.3f}% | "
                f"{100 * c['frac_over_1ulp']:.4f}% | {outside} | "
                f"{'`' + c['worst'] + '`' if c['max_abs_diff'] else '–'} |"
            )
            if c["missing_in_a"] or c["missing_in_b"]:
                L.append(
                    f"|  |  |  | tensors only in one output: {len(c['missing_in_a'])} / "
                    f"{len(c['missing_in_b'])} | | | | | |"
                )
    fails = [r for r in rows if r["errors"]]
    if fails:
        L.append("")
        L.append("## Failures")
        for r in fails:
            L.append("")
            L.append(
                f"- {r['size']} N={r['n']} {r['method']} {r['variant']}: exit "
                f"{', '.join(map(str, r['rcs']))}, {len(r['errors'])} of {r['runs']} runs"
            )
            L.append("")
            L.append("  ```")
            L.append("  " + r["cmd"])
            for line in r["errors"][0].splitlines()[-15:]:
                L.append("  " + line)
            L.append("  ```")
    L.append("")
    L.append("## All runs")
    L.append("")
    L.append("<details><summary>per-run numbers</summary>")
    L.append("")
    L.append("| size | N | method | variant | repeat | exit | wall s | CPU s | peak RSS MB | others' load |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in results["runs"]:
        L.append(
            f"| {m['size']} | {m['n']} | {m['method']} | {m['variant']} | {m['repeat']} | {m['rc']} | "
            f"{m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['maxrss_mb']:.0f} | "
            f"{m.get('others_cores', 0):.2f} |"
        )
    L.append("")
    L.append("</details>")
    L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


# ---------------------------------------------------------------- cli


def csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--sizes", type=csv, default=["168m"], help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument(
        "--n-models",
        type=lambda s: [int(x) for x in csv(s)],
        default=[4],
        help="comma list of fine-tune counts, 2..8 (default 4)",
    )
    ap.add_argument(
        "--methods",
        type=csv,
        default=list(DEFAULT_METHODS),
        help=f"comma list of {', '.join(ALL_METHODS)} (mergekit runs only {', '.join(sorted(MERGEKIT_METHODS))})",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", type=csv, default=["tadrop", "mergekit"], help="tadrop, mergekit or both")
    ap.add_argument("--tadrop", type=csv, default=["off", "on"], help="TADrop settings to run: off,on")
    ap.add_argument("--quick", action="store_true", help="smallest size, 1 repeat")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "speed.md")
    ap.add_argument("--mergekit-dtype", default="bfloat16", help="mergekit's `dtype` (compute dtype)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the output cross-check")
    ap.add_argument(
        "--no-fp32-check",
        dest="fp32_check",
        action="store_false",
        help="skip the extra mergekit run with dtype float32 for the cross-check",
    )
    ap.add_argument("--keep-outputs", action="store_true", help="keep merged outputs under bench/.cache/speed")
    ap.add_argument("--seed", type=int, default=0, help="merge seed (random methods)")
    ap.add_argument("--ckpt-seed", type=int, default=0, help="checkpoint generator seed")
    ap.add_argument("--tadrop-cmd", default=None, help="how to call tadrop (default: the venv's `tadrop`)")
    ap.add_argument("--tadrop-args", default="", help="extra arguments for `tadrop merge`")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    ap.add_argument(
        "--mergekit-cmd",
        default=None,
        help="how to call mergekit-yaml, e.g. 'python3 -m mergekit.scripts.run_yaml' (default: "
        "bench/.venv-mergekit's, created on first use)",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both tools compute: mergekit --no-cuda / --cuda, tadrop --device cuda",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each timed run, wait up to this many seconds for the machine to be quiet (0: don't wait)",
    )
    ap.add_argument(
        "--idle-cores", type=float, default=0.3, help="'quiet' means other processes use fewer cores than this"
    )
    ap.add_argument("--setup-only", action="store_true", help="create the mergekit venv and exit")
    args = ap.parse_args(argv)

    if args.quick:
        args.sizes, args.repeats = ["40m"], 1
    for s in args.sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s}; choose from {', '.join(SIZES)}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m}; choose from {', '.join(ALL_METHODS)}")
    for t in args.tools:
        if t not in ("tadrop", "mergekit"):
            ap.error(f"unknown tool {t}")
    for n in args.n_models:
        if not 1 <= n <= 16:
            ap.error("--n-models values must be in 1..16")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    py = sys.executable
    results: dict = {
        "runs": [],
        "floors": {},
        "checks": [],
        "load": os.getloadavg(),
        "command": "python bench/speed/run.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    if args.mergekit_cmd and "mergekit" in args.tools:
        mk_python = shlex.split(args.mergekit_cmd)[0]
        results["mergekit_version"] = (
            sh(
                [
                    mk_python,
                    "-c",
                    "import importlib.metadata as m; print(m.version('mergekit'),"
                    " m.version('torch'), m.version('transformers'))",
                ]
            ).stdout.strip()
            or "unknown"
        )
    elif "mergekit" in args.tools or args.setup_only:
        results["mergekit_version"] = ensure_mergekit(py)
        log(f"mergekit ready: {results['mergekit_version']}")
        if args.setup_only:
            return 0
    tad = None
    if "tadrop" in args.tools:
        tad = tadrop_cmd(args)
        if not tad:
            raise SystemExit(
                "no `tadrop` command found: `pip install -e .` in this venv, or pass --tadrop-cmd "
                "(or run with --tools mergekit)"
            )
        results["tadrop_version"] = tadrop_version(tad)
    results["machine"] = machine_info(py, args.device)
    results["launcher_rss_mb"] = launcher_rss()

    rdir = CACHE / "results"
    rdir.mkdir(parents=True, exist_ok=True)
    raw = rdir / f"speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    load_start = results["load"]
    for size in args.sizes:
        for n in args.n_models:
            for method in args.methods:
                run_case(size, n, method, args, tad, py, results)
                # the report so far, after every case: a run cut short (a time limit) keeps its numbers
                results["load_end"] = tuple(round(x, 2) for x in os.getloadavg())
                results["load"] = tuple(round(x, 2) for x in load_start)
                raw.write_text(json.dumps(results, indent=1, default=str))
                write_report(args.out, results, args)
    log(f"wrote {args.out} and {raw}")
    bad = [m for m in results["runs"] if m["rc"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
