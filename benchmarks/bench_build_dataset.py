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
import gc
import json
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
SHARED = Path(os.environ.get("OPENSLOTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
CHAT_FILES = {
    "alpaca": ["alpaca_en_demo.jsonl"],
    "gsm8k": ["gsm8k_train-00000-of-00002.jsonl", "gsm8k_train-00001-of-00002.jsonl"],
    "hh_rlhf": ["hh_rlhf_helpful_base_test.jsonl"],
    "arena_hard": ["arena_hard_v0.1.jsonl"],
}


def tokenised_datasets(replicate_rows: int):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "qwen3"))
    rng = np.random.default_rng(0)
    out = {}
    for name, files in CHAT_FILES.items():
        records = [json.loads(line) for f in files for line in open(SHARED / "chat" / f, encoding="utf-8")
                   if line.strip()]
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
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


def best_times(fns, rounds: int, inner: int):
    """Best wall and best CPU (process) time, and the last result, of each function. In each of ``rounds`` rounds
    every function runs ``inner`` times in a row (timeit-style: warm caches for whichever runs), the functions
    taking turns between rounds so that load from other processes on a shared machine falls on all of them alike.
    CPU time is the steadier figure there (every builder here runs on one thread)."""
    wall, cpu, results = [float("inf")] * len(fns), [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(inner):
                gc.collect()
                w0, c0 = time.perf_counter(), time.process_time()
                results[i] = fn()
                wall[i] = min(wall[i], time.perf_counter() - w0)
                cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu, results


def row_layout(ds):
    """(row offsets of input_ids, flat seq_lengths) of a packed dataset."""
    table = ds.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    seq = table.column("seq_lengths").combine_chunks()
    return ids.offsets.to_numpy(), seq.values.to_numpy(), seq.offsets.to_numpy(), ids.values.to_numpy()


def same_rows(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(row_layout(a), row_layout(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacities", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of timed runs, builders taking turns (at most 3 on sets over 50k rows)")
    parser.add_argument("--inner", type=int, default=3,
                        help="consecutive runs of each builder per round (1 on sets over 50k rows)")
    parser.add_argument("--replicate-rows", type=int, default=100_000,
                        help="rows of the replicated set (0: none)")
    parser.add_argument("--backend", default=None, help="packing backend for ours (default: OPENSLOTH_BACKEND/auto)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write the results file")
    args = parser.parse_args()

    from trl.data_utils import pack_dataset

    from benchmarks._report import machine_header, markdown_table, write_result
    from opensloth.data.packed import build_packed_dataset
    from opensloth.packing import get_backend

    backend = args.backend or get_backend()
    t0 = time.perf_counter()
    data = tokenised_datasets(args.replicate_rows)
    print(f"tokenised {len(data)} datasets in {time.perf_counter() - t0:.1f}s", flush=True)
    build_packed_dataset(data["alpaca"], 2048, backend=backend)  # warm-up: imports, JIT

    rows = []
    for name, ds in data.items():
        lengths = np.asarray(ds.with_format("arrow")[:].column("input_ids").combine_chunks().value_lengths())
        for cap in args.capacities:
            big = len(ds) > 50_000
            wall, cpu, ((ours, stats), trl, whole) = best_times([
                lambda ds=ds, cap=cap: build_packed_dataset(ds, cap, backend=backend, return_stats=True,
                                                            progress=False),
                lambda ds=ds, cap=cap: pack_dataset(ds, cap, strategy="bfd"),
                lambda ds=ds, cap=cap: pack_dataset(ds, cap, strategy="bfd", map_kwargs={"batch_size": len(ds)}),
            ], min(args.rounds, 3) if big else args.rounds, 1 if big else args.inner)
            kept = int(np.minimum(lengths, cap).sum())
            bound = -(-kept // cap)
            identical = same_rows(ours, whole)
            assert stats.n_tokens == kept and stats.lower_bound == bound

            def ms(i, wall=wall, cpu=cpu):
                return f"{wall[i] * 1e3:.1f} / {cpu[i] * 1e3:.1f}"

            def ratio(i, wall=wall, cpu=cpu):
                return f"{wall[i] / wall[0]:.1f}x / {cpu[i] / cpu[0]:.1f}x"

            rows.append([
                name, len(ds), cap, int((lengths > cap).sum()), ms(0), ms(1), ms(2), ratio(1), ratio(2),
                len(ours), f"+{len(ours) - bound}", f"+{len(trl) - bound}", f"+{len(whole) - bound}",
                "yes" if identical else "NO",
            ])
            print(" | ".join(str(v) for v in rows[-1]), flush=True)

    header = ["dataset", "samples", "capacity", "overlong (truncated)", "ours ms wall / cpu",
              "TRL ms (1000-row batches) wall / cpu", "TRL ms (whole dataset) wall / cpu",
              "speed-up vs TRL wall / cpu", "speed-up vs TRL whole wall / cpu", "rows (ours)",
              "ours over bound", "TRL over bound", "TRL whole over bound", "rows identical to TRL whole"]
    table = markdown_table(header, rows)
    notes = (
        f"Ours: `build_packed_dataset(ds, capacity)` (overlong='truncate', BFD over the whole dataset, backend "
        f"`{backend}`). TRL: `pack_dataset(ds, capacity, strategy='bfd')` (its default 1000-row map batches), and "
        "with `map_kwargs={'batch_size': len(ds)}` (one batch: the same BFD as ours). Times are the best of "
        f"{args.rounds} rounds x {args.inner} consecutive runs per builder ({min(args.rounds, 3)} x 1 on sets over "
        "50k rows), the builders taking turns between rounds, on in-memory datasets with columns input_ids and "
        "labels, including reading the columns and building the output Dataset; wall = elapsed time, cpu = this "
        "process's CPU time (steadier when other processes share the cores). 'over bound' = rows - ceil(tokens / "
        "capacity). 'identical' "
        "compares every row's tokens and seq_lengths with TRL over the whole dataset."
    )
    print(table)
    if not args.no_write:
        command = "python benchmarks/bench_build_dataset.py " + " ".join(sys.argv[1:])
        path = write_result("build_dataset", "Packed-dataset build: opensloth vs TRL pack_dataset (BFD)",
                            [("Build time and rows", notes + "\n\n" + table)],
                            header=machine_header(command=command.strip()))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
