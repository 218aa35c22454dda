"""How long a merge will take on an idle CPU, from what the dry run counts: rates, no I/O.

The rates were measured with bench/speed on this project's 2-core machine (docs/speed.md), each
merge as a whole process, 168M-parameter bf16 model, 4 fine-tunes:
- the compiled kernels (task arithmetic, TIES, DARE...): about 2.5 GB of input per second per
  sweep (TIES: a 1.69 GB input swept three times in ~2.1 s);
- PyTorch's element-wise hosts (Consensus TIES): about 0.5 GB/s per sweep (9.7 s);
- hosts that rank within rows (DELLA): about 0.12 GB/s (16.2 s);
- the SVD hosts: about 5.2e-10 s per model per m * n^2 of each (m >= n) matrix on the exact
  route (4096 x 4096, 4 models: 143 s on one core), the fast route ~1.5x less, two cores ~1.6x.
Plus starting the process, and importing torch where PyTorch runs.

Memory (the dry run's peak): the merge's own buffers (run.dry_run), plus the process: ~100 MB where
the kernels merge every tensor, ~300 MB with torch, and for a tokenizer merge torch, transformers
and every tokenizer loaded (tokenizer_runtime_bytes), and the rows an aligned vocabulary tensor's
read assembles (aligned_entries). A busy machine, a cold page
cache or another CPU can take several times longer: the figure is for planning, not a promise.
"""

from __future__ import annotations

import math

KERNEL_BYTES_PER_SECOND = 2.5e9
TORCH_BYTES_PER_SECOND = 0.5e9
RANKED_ROWS_BYTES_PER_SECOND = 0.12e9
SVD_SECONDS_PER_MODEL_MN2 = 5.2e-10
FAST_SVD_SPEEDUP = 1.5
TWO_CORES_SPEEDUP = 1.6
START_SECONDS = 0.3  # Python and tadrop's imports
TORCH_IMPORT_SECONDS = 1.5

PATHS = ("kernels", "torch", "ranked_rows", "svd")

# a tokenizer merge's process, measured on this project's machine (torch 2.13, transformers 5.24): a
# whole merge of tiny models (10-token vocabularies) peaks at 335 MB in one venv and 380 MB in a fresh
# CI venv with the same versions (not explained; an estimate must cover both, so 450 MB); four
# 33.5k-token tokenizers and their 33.5k-token union hold ~63 MB more than four of 374 tokens
# (~375 bytes a token loaded)
TOKENIZER_RUNTIME_BYTES = 450 * 2**20
TOKEN_BYTES = 400


def tensor_seconds(path: str, read_bytes: int, shape: tuple[int, ...], models: int, exact_svd: bool = False) -> float:
    """Seconds to merge one tensor whose inputs take `read_bytes` over all its sweeps, by `path`
    (one of PATHS: the compiled kernels, PyTorch element-wise, ranking within rows, the SVD hosts)."""
    if path == "kernels":
        return read_bytes / KERNEL_BYTES_PER_SECOND
    if path == "ranked_rows":
        return read_bytes / RANKED_ROWS_BYTES_PER_SECOND
    if path == "svd" and len(shape) == 2:
        m, n = max(shape), min(shape)
        seconds = SVD_SECONDS_PER_MODEL_MN2 * models * m * n * n / TWO_CORES_SPEEDUP
        return read_bytes / TORCH_BYTES_PER_SECOND + seconds / (1.0 if exact_svd else FAST_SVD_SPEEDUP)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}")
    return read_bytes / TORCH_BYTES_PER_SECOND  # PyTorch element-wise, and an SVD host's 1-D tensors


def merge_seconds(tensor_seconds_total: float, uses_torch: bool) -> float:
    """The whole merge: the tensors, the process's start and torch's import where it is needed."""
    return tensor_seconds_total + START_SECONDS + (TORCH_IMPORT_SECONDS if uses_torch else 0.0)


def rounded(seconds: float) -> float:
    """Two significant figures (at least 0.1 s): the estimate is no more precise than that."""
    if seconds <= 0.1:
        return 0.1
    digits = 1 - int(math.floor(math.log10(seconds)))
    return round(seconds, digits)


def tokenizer_runtime_bytes(loaded_tokens: int) -> int:
    """The process's own memory in a tokenizer merge: torch and transformers imported, and the
    tokenizers loaded, `loaded_tokens` tokens in all (the inputs' and the merged one's)."""
    return TOKENIZER_RUNTIME_BYTES + TOKEN_BYTES * loaded_tokens


def aligned_entries(models: int, entries: int) -> int:
    """float32-sized entries that reading an aligned vocabulary tensor holds besides the merge's own
    buffers, where a read covers `entries` of it (a slice, or the whole tensor): each of `models`
    models' gathered rows (read in stored order, then put in output order: two copies, at most 4 bytes
    an entry), and the block's default rows in float32."""
    return (2 * models + 1) * entries
