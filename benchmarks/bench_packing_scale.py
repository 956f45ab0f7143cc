"""Packing core at real sizes: time and peak memory of the calls that used to die or take minutes (issue 15).

- ``partition_padded`` of 10M lengths into 1,024 batches (the whole table of split points needed 41 GB natively and
  82 GB in numba; it is now sized first and held in blocks);
- ``balance`` of 10M items into 8 parts (the numba and python swap refinement scanned every pair of two parts; the
  numba and python Karmarkar-Karp built n x parts arrays up front);
- the python backend's BFD of 10M lengths at capacity 2**40 (it kept a queue for every free-space value ever
  reached: ~9 GB).

Each case runs in a fresh single-threaded process: wall time of the call, and the peak resident memory it added
(``ru_maxrss`` after the call minus before, imports and numba compilation done first). Usage::

    python benchmarks/bench_packing_scale.py            # the real sizes; writes benchmarks/results/packing_scale.md
    python benchmarks/bench_packing_scale.py --quick    # sizes / 100, written to /tmp/packing_scale_quick.md
    python benchmarks/bench_packing_scale.py --python-10m   # also the pure-Python balance at 10M (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREADS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_CHILD = r"""
import json, sys, time
import numpy as np
from opensloth import packing
from opensloth.packing import _validate

from benchmarks._peak_memory import peak_added, peak_start

case, backend, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
if case == "bfd-2**40":
    lengths = np.clip(rng.lognormal(np.log(400), 0.9, n).round(), 8, 4096).astype(np.int64)
    call = lambda: packing.pack_lengths(lengths, 2**40, backend=backend)
    warm = lambda: packing.pack_lengths(lengths[:500], 2**40, backend=backend)
elif case == "partition":
    lengths = np.clip(rng.lognormal(np.log(400), 0.9, n).round(), 8, 4096).astype(np.int64)
    call = lambda: packing.partition_padded(lengths, k, backend=backend)
    warm = lambda: packing.partition_padded(lengths[:500], 16, backend=backend)
else:  # balance-lognormal / balance-even
    if case == "balance-even":  # even costs, total 2 mod 4: the refinement's last round has no candidate
        costs = 2 * rng.integers(1, 1000, n)
        if costs.sum() % 4 == 0:
            costs[0] += 2
    else:
        costs = np.clip(rng.lognormal(np.log(400), 0.9, n).round(), 8, 4096).astype(np.int64)
    call = lambda: packing.balance(costs, k, backend=backend)
    warm = lambda: (packing.balance(costs[:500], k, backend=backend),
                    packing.balance(costs[:500], k, equal_count=True, backend=backend))
warm()
start, exact = peak_start()
t0 = time.perf_counter()
out = call()
seconds = time.perf_counter() - t0
grown = peak_added(start, exact)
extra = {}
if case == "partition":
    rows = _validate.partition_rows(n, k)
    extra = {"rows": rows, "planned": _validate.partition_memory(n, k, rows),
             "full_table": (k - 1) * (n + 1) * (4 if backend == "native" else 8)}
print(json.dumps({"seconds": seconds, "grown": grown, **extra}))
"""


def run_case(case: str, backend: str, n: int, k: int, timeout: float) -> dict:
    env = dict(os.environ, **{v: "1" for v in THREADS}, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, case, backend, str(n), str(k)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(v: float) -> str:
    return f"{v / 2**20:,.0f} MiB" if v < 2**30 else f"{v / 2**30:.2f} GiB"


def main() -> None:
    from benchmarks._report import machine_header, markdown_table, write_result
    from opensloth.packing import available_backends

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 100 (a smoke run), written to /tmp")
    parser.add_argument("--python-10m", action="store_true", help="also the pure-Python balance at 10M (minutes)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    args = parser.parse_args()
    scale = 100 if args.quick else 1
    big, mid = 10_000_000 // scale, 1_000_000 // scale
    backends = available_backends()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    part_rows = []
    for n, k in ((mid, 1024), (big, 1024)):
        for b in backends:
            if b == "python" and n * k > 2 * 10**6:  # ~n*k Python-level steps: 100 s at 10k x 1,024
                part_rows.append((f"{n:,}", k, b, "not run: about n x K Python-level steps (10k x 1,024: 100 s)",
                                  "-", "-", "-"))
                continue
            log(f"partition_padded n={n:,} K={k} {b}")
            r = run_case("partition", b, n, k, args.timeout)
            if "error" in r:
                part_rows.append((f"{n:,}", k, b, r["error"], "-", "-", "-"))
            else:
                part_rows.append((f"{n:,}", k, b, f"{r['seconds']:.2f}", _mib(r["grown"]), _mib(r["planned"]),
                                  f"{r['rows']} ({_mib(r['full_table'])})"))
    bal_rows = []
    for case in ("balance-lognormal", "balance-even"):
        for b in backends:
            n = big if (b != "python" or args.python_10m) else mid
            log(f"{case} n={n:,} K=8 {b}")
            r = run_case(case, b, n, 8, args.timeout)
            bal_rows.append((case.split("-")[1], f"{n:,}", b, r.get("error") or f"{r['seconds']:.2f}",
                             "-" if "error" in r else _mib(r["grown"])))
    bfd_rows = []
    for b in backends:
        log(f"bfd capacity 2**40 n={big:,} {b}")
        r = run_case("bfd-2**40", b, big, 0, args.timeout)
        bfd_rows.append((f"{big:,}", b, r.get("error") or f"{r['seconds']:.2f}",
                         "-" if "error" in r else _mib(r["grown"])))

    command = "python benchmarks/bench_packing_scale.py" + (" --quick" if args.quick else "") + \
        (" --python-10m" if args.python_10m else "")
    header = machine_header(("numpy", "numba"), command=command) + (
        "\n- each case in a fresh process, one thread (NUMBA_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS="
        "OPENBLAS_NUM_THREADS=1); seconds = wall time of the one call; peak added = the process's peak RSS during "
        "the call (VmHWM, reset before it) minus its RSS before it (imports and numba compilation done first); "
        f"one run each, on {os.cpu_count()} cores shared with other work"
    )
    sections = [
        ("partition_padded: 1M and 10M lognormal lengths into 1,024 batches",
         "Before: the whole table of split points, (K - 1) x (n + 1) entries of 4 bytes natively and 8 in numba and "
         "python, allocated without a check (10M x 1,024: bad_alloc / 'Allocation failed'). Now: sized first; above "
         "256 MiB of table the DP holds `rows` rows of split points and recomputes earlier blocks from saved rows "
         "(the same result, at most twice the time); above `OPENSLOTH_PACKING_MEMORY_GB` (8 GiB) it is refused.\n\n"
         + markdown_table(("n", "K", "backend", "seconds", "peak added", "planned", "rows held (old full table)"),
                          part_rows)),
        ("balance: 10M items into 8 parts",
         "*lognormal*: lengths as above; *even*: even costs whose total is 2 mod 4, so the refinement's last round "
         "finds no candidate after looking at every pair (the quadratic case before: over 10 minutes in numba). "
         "Pure Python at 1M unless `--python-10m`.\n\n"
         + markdown_table(("costs", "n", "backend", "seconds", "peak added"), bal_rows)),
        ("BFD at capacity 2**40 (every placement reaches a new free-space value)",
         "Before: the python backend kept an emptied queue per value ever reached (~930 bytes per length, ~9 GB at "
         "10M).\n\n" + markdown_table(("n", "backend", "seconds", "peak added"), bfd_rows)),
    ]
    if args.quick:
        path = Path("/tmp/packing_scale_quick.md")
        parts = ["# Packing core at scale (quick smoke run)", "", header, ""]
        for subtitle, body in sections:
            parts += [f"## {subtitle}", "", body, ""]
        path.write_text("\n".join(parts))
    else:
        path = write_result("packing_scale", "Packing core at scale", sections, header=header)
    log(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
