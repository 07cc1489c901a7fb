"""Step scripts: one per rule, run by Snakemake's `script:` (or by hand, see __main__).

Each script reads `snakemake.input/output/params`, calls the library and writes
its outputs. `setup` routes all output (Python and C level) to the rule's log.
"""

from __future__ import annotations

import logging
import os
import sys


def setup(snakemake, name: str) -> logging.Logger:
    """Send stdout/stderr and logging to the rule's log file; cap BLAS/torch threads."""
    threads = max(1, int(getattr(snakemake, "threads", 1) or 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # spinning OpenMP threads stall badly when jobs share a few cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log_files = list(getattr(snakemake, "log", []) or [])
    if log_files:
        path = str(log_files[0])
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fh = open(path, "a", buffering=1)  # noqa: SIM115 - lives for the whole step
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logger = logging.getLogger(f"vsbench.{name}")
    logger.info("threads=%d", threads)
    return logger


def torch_threads(snakemake) -> int:
    """Give torch exactly the rule's thread budget."""
    import torch

    threads = max(1, int(getattr(snakemake, "threads", 1) or 1))
    torch.set_num_threads(threads)
    return threads


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device is 'cuda' but no CUDA device is available")
    return requested


def bounded_map(pool, fn, items, window: int):
    """pool.map that keeps at most `window` results ahead of the consumer, so memory holds
    `window` + 1 items (pool.map would compute and hold all of them if the consumer lags)."""
    import collections

    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
