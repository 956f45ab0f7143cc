"""Packed-dataset build: opensloth.data.packed.build_packed_dataset vs trl.data_utils.pack_dataset(strategy="bfd").

Data: every shared chat dataset (../shared/data) tokenised with the Qwen3 chat template (labels hide a random prefix
of each sample, so both builders carry two token columns), all of them together, and that set replicated to
--replicate-rows rows. For each dataset and capacity: build time (best of several runs), rows, rows over the lower
bound ceil(tokens / capacity), and speed ratios against TRL as users run it (1000-row map batches, its default) and
TRL over the whole dataset in one batch (the same BFD as ours: the rows must be identical, checked every time).

    python benchmarks/bench_build_dataset.py                 # writes benchmarks/results/build_dataset.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._shared_data import (  # noqa: E402
    SHARED_CHAT_FILES,
    chat_template_token_ids,
    read_shared_chat,
    shared_data_dir,
)

SHARED = shared_data_dir()


def tokenised_datasets(replicate_rows: int):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "qwen3"))
    rng = np.random.default_rng(0)
    out = {}
    for name in SHARED_CHAT_FILES:
        ids = chat_template_token_ids(read_shared_chat(name, SHARED / "chat"), tok)
        labels = []
        for row in ids:
            cut = int(rng.integers(0, len(row)))
            labels.append([-100] * cut + row[cut:])
        out[name] = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    everything = datasets.concatenate_datasets(list(out.values())).flatten_indices()
    out["all"] = everything
    if replicate_rows:
        copies = -(-replicate_rows // len(everything))
        big = datasets.concatenate_datasets([everything] * copies).select(range(replicate_rows)).flatten_indices()
        out[f"all x{replicate_rows // 1000}k rows"] = big
    return out


def timed_rounds(fns, rounds: int, inner: int):
    """Wall and CPU (process) time of each function in each round, and the last result of each.

    In every round each function runs ``inner`` times in a row (timeit-style: warm caches for whichever runs) and
    the round keeps its best run; the functions take turns between rounds, so that load from other processes on a
    shared machine falls on all of them alike and a per-round ratio compares runs made under the same load. Every
    run starts after ``gc.collect()`` (the collection itself is not timed). Returns ``(wall, cpu, results)`` with
    ``wall[i][r]`` the best wall time of function ``i`` in round ``r``."""
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best_w = best_c = float("inf")
            for _ in range(inner):
                results[i] = None
                gc.collect()
                w0, c0 = time.perf_counter(), time.process_time()
                results[i] = fn()
                best_w = min(best_w, time.perf_counter() - w0)
                best_c = min(best_c, time.process_time() - c0)
            wall[i].append(best_w)
            cpu[i].append(best_c)
    return wall, cpu, results


def spread(values, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """'median [min-max]' of a list of numbers."""
    v = np.asarray(values, dtype=float) * scale
    return f"{fmt.format(np.median(v))} [{fmt.format(v.min())}-{fmt.format(v.max())}]"


def row_layout(ds):
    """(row offsets of input_ids, flat seq_lengths) of a packed dataset."""
    table = ds.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    seq = table.column("seq_lengths").combine_chunks()
    return ids.offsets.to_numpy(), seq.values.to_numpy(), seq.offsets.to_numpy(), ids.values.to_numpy()


def same_rows(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(row_layout(a), row_layout(b)))


def gather_section(ds, capacity: int, repeats: int) -> str:
    """Time the segment gather alone on one dataset: each column's samples in packed order, per implementation,
    against a plain sequential copy of the same bytes (np.copyto) and arrow's list-view take + flatten (the
    builder's previous method). Output arrays are preallocated and reused, so page faults are not counted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from benchmarks._report import markdown_table
    from opensloth.data.packed import _list_column
    from opensloth.packing import available_backends, pack_lengths
    from opensloth.packing._gather import check_segments, run_gather

    table = ds.with_format("arrow")[:]
    rows = []
    for name in ("input_ids", "labels"):
        col = _list_column(table, name)
        lengths = np.minimum(col.lengths, capacity)
        order = pack_lengths(lengths, capacity).items
        seg = check_segments(col.sources, col.starts, lengths, order, chunks=col.chunks)
        out = np.empty(seg.size, dtype=seg.dtype)
        flat = np.concatenate(col.sources)[: seg.size].copy()
        base = np.cumsum([0] + [len(s) for s in col.sources[:-1]])
        gstarts = col.starts + (base[col.chunks] if col.chunks is not None else 0)
        view = pa.ListViewArray.from_arrays(pa.array(gstarts, type=pa.int32()), pa.array(lengths, type=pa.int32()),
                                            pa.array(np.concatenate(col.sources)))
        ref = None
        cases = [(f"gather {b}", functools.partial(run_gather, seg, out, b))
                 for b in ("native", "numba", "numpy") if b == "numpy" or b in available_backends()]
        cases += [("np.copyto (sequential copy, same bytes)", functools.partial(np.copyto, out, flat)),
                  ("arrow list-view take + flatten (one flat source)",
                   lambda view=view, order=order: pc.list_flatten(view.take(order)))]
        for label, fn in cases:
            fn()  # warm-up (numba compiles or loads its cache)
            if label.startswith("gather"):
                ref = out.copy() if ref is None else ref
                assert np.array_equal(out, ref), f"{label} differs"
            times = []
            for _ in range(repeats):
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            gbs = seg.size * seg.dtype.itemsize / np.median(times) / 1e9
            rows.append([name, str(seg.dtype), seg.size, len(col.sources), label, spread(times, 1e3),
                         f"{gbs:.2f}"])
    header = ["column", "dtype", "tokens", "source chunks", "method", "ms median [min-max]", "GB/s copied"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacities", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds of timed runs, builders taking turns (--big-rounds on sets over 50k rows)")
    parser.add_argument("--inner", type=int, default=3,
                        help="consecutive runs of each builder per round, the round keeping the best (1 on sets "
                             "over 50k rows)")
    parser.add_argument("--big-rounds", type=int, default=5, help="rounds on sets over 50k rows")
    parser.add_argument("--replicate-rows", type=int, default=100_000,
                        help="rows of the replicated set (0: none)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="only these datasets (alpaca gsm8k hh_rlhf arena_hard all, or 'big' for the "
                             "replicated set); implies --no-write")
    parser.add_argument("--gather-repeats", type=int, default=9, help="runs per method in the gather section")
    parser.add_argument("--backend", default=None, help="packing backend for ours (default: OPENSLOTH_BACKEND/auto)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write the results file")
    args = parser.parse_args()

    from trl.data_utils import pack_dataset

    from benchmarks._report import machine_header, markdown_table, write_result
    from opensloth.data.packed import build_packed_dataset
    from opensloth.packing import get_backend
    from opensloth.packing._gather import gather_backend

    backend = args.backend or get_backend()
    gather = gather_backend(backend)
    t0 = time.perf_counter()
    data = tokenised_datasets(args.replicate_rows)
    big_name = next((n for n in data if n.startswith("all x")), None)
    if args.datasets:
        wanted = {big_name if n == "big" else n for n in args.datasets}
        data = {n: d for n, d in data.items() if n in wanted}
        args.no_write = True
    print(f"tokenised {len(data)} datasets in {time.perf_counter() - t0:.1f}s", flush=True)
    first = next(iter(data.values()))
    build_packed_dataset(first.select(range(min(100, len(first)))), 2048, backend=backend)  # warm-up: imports, JIT

    rows = []
    goal = []  # (dataset, capacity, median speed-up vs TRL, vs TRL whole, lowest round of either)
    for name, ds in data.items():
        lengths = np.asarray(ds.with_format("arrow")[:].column("input_ids").combine_chunks().value_lengths())
        for cap in args.capacities:
            big = len(ds) > 50_000
            wall, cpu, ((ours, stats), trl, whole) = timed_rounds([
                lambda ds=ds, cap=cap: build_packed_dataset(ds, cap, backend=backend, return_stats=True,
                                                            progress=False),
                lambda ds=ds, cap=cap: pack_dataset(ds, cap, strategy="bfd"),
                lambda ds=ds, cap=cap: pack_dataset(ds, cap, strategy="bfd", map_kwargs={"batch_size": len(ds)}),
            ], args.big_rounds if big else args.rounds, 1 if big else args.inner)
            kept = int(np.minimum(lengths, cap).sum())
            bound = -(-kept // cap)
            identical = same_rows(ours, whole)
            assert stats.n_tokens == kept and stats.lower_bound == bound
            ratio = [np.asarray(t) / np.asarray(wall[0]) for t in wall]
            cpu_ratio = [np.median(np.asarray(t) / np.asarray(cpu[0])) for t in cpu]
            rows.append([
                name, len(ds), cap, int((lengths > cap).sum()),
                spread(wall[0], 1e3, "{:.2f}" if np.median(wall[0]) < 0.1 else "{:.1f}"), spread(wall[1], 1e3),
                spread(wall[2], 1e3), spread(ratio[1], fmt="{:.1f}x"), spread(ratio[2], fmt="{:.1f}x"),
                f"{cpu_ratio[1]:.1f}x / {cpu_ratio[2]:.1f}x",
                len(ours), f"+{len(ours) - bound}", f"+{len(trl) - bound}", f"+{len(whole) - bound}",
                "yes" if identical else "NO",
            ])
            goal.append((name, cap, float(np.median(ratio[1])), float(np.median(ratio[2])),
                         float(min(ratio[1].min(), ratio[2].min()))))
            print(" | ".join(str(v) for v in rows[-1]), flush=True)

    header = ["dataset", "samples", "capacity", "overlong (truncated)", "ours ms", "TRL ms (1000-row batches)",
              "TRL ms (whole dataset)", "speed-up vs TRL", "speed-up vs TRL whole", "speed-up by CPU time (TRL / "
              "TRL whole)", "rows (ours)", "ours over bound", "TRL over bound", "TRL whole over bound",
              "rows identical to TRL whole"]
    table = markdown_table(header, rows)
    rounds = (f"{args.rounds} rounds x best of {args.inner} consecutive runs ({args.big_rounds} x 1 on sets over "
              "50k rows)")
    notes = (
        f"Ours: `build_packed_dataset(ds, capacity)` (overlong='truncate', BFD over the whole dataset, packing "
        f"backend `{backend}`, gather `{gather}`). TRL: `pack_dataset(ds, capacity, strategy='bfd')` (its default "
        "1000-row map batches), and with `map_kwargs={'batch_size': len(ds)}` (one batch: the same BFD as ours). "
        f"Timing: {rounds} per builder, the builders taking turns between rounds, each run after gc.collect(), on "
        "in-memory datasets with columns input_ids (int32) and labels (int64), including reading the columns and "
        "building the output Dataset. Times are wall-clock ms, 'median [min-max]' over the rounds; a speed-up is "
        "TRL's time / ours in the same round, 'median [min-max]' over the rounds (the CPU-time column: the median "
        "of the same ratio on process CPU time, steadier when other processes share the cores). 'over bound' = "
        "rows - ceil(tokens / capacity). 'identical' compares every row's tokens and seq_lengths with TRL over the "
        "whole dataset."
    )
    short = [f"{n} @ {c} ({a:.1f}x / {b:.1f}x)" for n, c, a, b, _ in goal if min(a, b) < 10]
    dips = [f"{n} @ {c} ({lo:.1f}x)" for n, c, a, b, lo in goal if min(a, b) >= 10 and lo < 10]
    summary = (
        f"10x goal, median per-round speed-up against both TRL runs: met on {len(goal) - len(short)} of {len(goal)} "
        f"dataset x capacity cases" + (f"; missed on {', '.join(short)}" if short else "") + ". "
        + (f"Met by the median but with a round below 10x on: {', '.join(dips)}." if dips else
           "No round of a met case fell below 10x.")
    )
    print(summary)
    print(table)
    sections = [("Build time and rows", notes + "\n\n" + summary + "\n\n" + table)]
    if big_name in data:
        gtable = gather_section(data[big_name], 4096, args.gather_repeats)
        print(gtable)
        sections.append(("The gather alone", (
            f"The token copy inside the build, on `{big_name}` at capacity 4096: every sample's tokens in packed "
            "order from the column's arrow chunks (read in place) into one preallocated output, by "
            "`opensloth.packing._gather.run_gather` per implementation (validated once beforehand, not timed), "
            "against a sequential copy of the same number of bytes and against arrow's list-view take + flatten "
            f"(the builder's previous method). {args.gather_repeats} runs each, after gc.collect(); GB/s = output "
            "bytes / median time.\n\n" + gtable)))
    if not args.no_write:
        command = "python benchmarks/bench_build_dataset.py " + " ".join(sys.argv[1:])
        path = write_result("build_dataset", "Packed-dataset build: opensloth vs TRL pack_dataset (BFD)",
                            sections, header=machine_header(command=command.strip()))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
