"""Predicted multi-GPU scaling from one GPU's micro-batch timings: a simulation, not a measurement.

    python benchmarks/sim_scaling.py TIMINGS.json        # writes benchmarks/results/scaling_sim.md

The multi-GPU machines are not lent, so the DDP step is simulated from timings measured on one GPU:

1. **Time model.** TIMINGS.json holds measured micro-batch timings of controlled composition, per model shape.
   How well does `opensloth.sampler.WorkModel` (the cost the sampler balances) predict them? Its work (tokens +
   padded slots + sum of squared sample lengths / attn_tokens) is fitted to the times with one scale factor, and
   once more with a constant per micro-batch added (every rank runs as many micro-batches, so a constant never
   unbalances them: the work model counts as off when the median error of this second fit exceeds twice the
   refit's plus 0.5%); the relative errors are reported. Then a least-squares refit
   of ``ms = c0 + c_slots x slots computed + c_attn x sum(l^2) + c_pad_attn x (rows x width^2 - sum(l^2))``
   (non-negative coefficients; the last term only for padded micro-batches, whose dense attention also covers the
   padding), with its errors and the attn_tokens it implies (c_slots / c_attn) next to the work model's.
2. **DDP step.** For each sampler of benchmarks/bench_sampler.py (round-robin, Unsloth's token balance,
   transformers' batch_rebalance, ours) on the shared data (unpacked padding-free samples, padded samples, packed
   rows; 8 samples or one row of 4096 per micro-batch, gradient accumulation 4; ours balancing the shape's work
   model, as ``use_balanced_sampler`` does with ``WorkModel.for_config``), at 2, 4 and 8 GPUs: each rank's step
   time is the sum of its micro-batches' refit times; a step takes the slowest rank's time plus the ring all-reduce
   of the LoRA gradients, ``2 (n - 1) / n x lora_param_bytes / bus bandwidth`` at 329 GB/s (NCCL bus bandwidth
   measured for 1 GiB on two H100s of one host; the all-reduce is not overlapped with the backward here, which
   over-states its cost).
3. **Scaling efficiency** at n GPUs: the time one GPU takes for the same micro-batches (the sum over ranks, no
   all-reduce) over n x the simulated DDP time, over the epoch; and the predicted real tokens/s per GPU.

TIMINGS.json (written by the GPU timing run)::

    {"source": "free text: GPU, versions, command",
     "records": [{"shape": "qwen3-0.6b", "lengths": [812, 3004, 280], "padded_slots": 0, "layout": "flat",
                  "ms": 41.7}, ...],
     "shapes": [{"shape": "qwen3-0.6b", "lora_param_bytes": 40370176,
                 "attn_tokens": 7680.0}, ...]}

``lengths`` are the micro-batch's real sample lengths; ``padded_slots`` the token slots computed beyond them
(padding); ``layout`` "flat" (padding-free or packed rows, attention per sample) or "padded" (one sample per row,
padded to the longest: rows = len(lengths), width = (sum(lengths) + padded_slots) / rows). A shape's
``attn_tokens`` (the work model's, e.g. ``WorkModel.for_config(config).attn_tokens``) is optional: the default
work model's is used without it (a ``config`` dict of hidden_size, intermediate_size, num_attention_heads,
num_key_value_heads, head_dim works too). A flat list of both kinds of record is read as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_sampler as bs  # noqa: E402
from benchmarks._report import RESULTS, machine_header, markdown_table  # noqa: E402
from opensloth.sampler import WorkModel  # noqa: E402

BUS_BANDWIDTH = 329e9  # bytes/s: NCCL all-reduce bus bandwidth, 1 GiB, two H100s of one host (the constant)
WORLD_SIZES = (2, 4, 8)
OFF = 0.005  # the work model is off when its median error exceeds twice the refit's plus this
FEATURES = ("constant", "slots computed", "sum l^2", "padded attention")


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    shape: str
    lengths: np.ndarray
    padded_slots: int
    layout: str
    ms: float

    @property
    def rows(self) -> int:
        return len(self.lengths) if self.layout == "padded" else 1

    def features(self) -> np.ndarray:
        return features(self.lengths, self.padded_slots, self.layout)


def features(lengths: np.ndarray, padded_slots: int, layout: str) -> np.ndarray:
    """[1, slots computed, sum l^2, padded attention]: what the refit time model multiplies."""
    lengths = np.asarray(lengths, dtype=np.float64)
    tokens = float(lengths.sum())
    squares = float(np.square(lengths).sum())
    slots = tokens + padded_slots
    pad_attention = 0.0
    if layout == "padded" and len(lengths):
        width = slots / len(lengths)
        pad_attention = max(0.0, len(lengths) * width * width - squares)
    return np.asarray([1.0, slots, squares, pad_attention])


@dataclass
class Timings:
    records: list[Record]
    shapes: dict[str, dict]
    source: str

    def work_model(self, shape: str) -> WorkModel:
        info = self.shapes.get(shape, {})
        if info.get("attn_tokens"):
            return WorkModel(attn_tokens=float(info["attn_tokens"]))
        if isinstance(info.get("config"), dict):
            return WorkModel.for_config(SimpleNamespace(**info["config"]))
        return WorkModel()


def load_timings(path: str | Path) -> Timings:
    raw: Any = json.loads(Path(path).read_text())
    if isinstance(raw, list):
        raw = {"records": [r for r in raw if "ms" in r], "shapes": [r for r in raw if "lora_param_bytes" in r]}
    records = []
    for i, r in enumerate(raw.get("records", [])):
        layout = r.get("layout", "flat")
        if layout not in ("flat", "padded"):
            raise ValueError(f"records[{i}].layout = {layout!r}: must be 'flat' or 'padded'")
        lengths = np.asarray(r["lengths"], dtype=np.int64)
        if lengths.size == 0 or (lengths <= 0).any():
            raise ValueError(f"records[{i}].lengths must be a non-empty list of positive sample lengths")
        if not np.isfinite(r["ms"]) or r["ms"] <= 0:
            raise ValueError(f"records[{i}].ms = {r['ms']!r} must be a positive time in milliseconds")
        records.append(Record(str(r["shape"]), lengths, int(r.get("padded_slots", 0)), layout, float(r["ms"])))
    shapes = {str(s["shape"]): dict(s) for s in raw.get("shapes", [])}
    missing = sorted({r.shape for r in records} - set(shapes))
    if missing:
        raise ValueError(f"shapes {missing} have timings but no {{'shape', 'lora_param_bytes'}} record")
    if not records:
        raise ValueError(f"{path} holds no timing record (a list of {{'shape', 'lengths', 'padded_slots', "
                         f"'layout', 'ms'}})")
    return Timings(records, shapes, str(raw.get("source", "")))


# ---------------------------------------------------------------------------------------------------------------
# The time model
# ---------------------------------------------------------------------------------------------------------------


def _errors(pred: np.ndarray, ms: np.ndarray) -> dict[str, float]:
    rel = np.abs(pred - ms) / ms
    ss_res = float(np.square(pred - ms).sum())
    ss_tot = float(np.square(ms - ms.mean()).sum())
    return {"median": float(np.median(rel)), "max": float(rel.max()), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative column and refit until none is negative
    (a small active-set loop; enough for four features)."""
    active = [j for j in range(x.shape[1]) if np.any(x[:, j] != 0)]
    while True:
        coef = np.zeros(x.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            coef[active] = sol
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))


@dataclass
class ShapeFit:
    shape: str
    n: int
    work_model: WorkModel
    scale: float  # ms per unit of work (work model, proportional)
    scale_errors: dict[str, float]
    affine: tuple[float, float]  # (ms per micro-batch, ms per unit of work)
    affine_errors: dict[str, float]
    coef: np.ndarray  # refit, over FEATURES
    refit_errors: dict[str, float]

    @property
    def implied_attn_tokens(self) -> float:
        return float(self.coef[1] / self.coef[2]) if self.coef[2] > 0 else float("inf")

    @property
    def work_model_off(self) -> bool:
        # Judged with the constant per micro-batch: every rank runs as many micro-batches, so a constant cost per
        # micro-batch never unbalances the ranks; only the work model's proportions matter to the sampler. Off:
        # clearly worse than the refit (which has the same noise to fit).
        return self.affine_errors["median"] > 2 * self.refit_errors["median"] + OFF

    def predict(self, lengths: np.ndarray, padded_slots: int, layout: str) -> float:
        return float(features(lengths, padded_slots, layout) @ self.coef)


def work_of(model: WorkModel, r: Record) -> float:
    """The work model's cost of a timed micro-batch: its samples' work plus the padded slots (linear)."""
    return model.batch_work(r.lengths) + r.padded_slots


def fit_shape(timings: Timings, shape: str) -> ShapeFit:
    recs = [r for r in timings.records if r.shape == shape]
    ms = np.asarray([r.ms for r in recs])
    model = timings.work_model(shape)
    work = np.asarray([work_of(model, r) for r in recs])
    scale = float(work @ ms / (work @ work))
    a = nonnegative_lstsq(np.stack([np.ones_like(work), work], axis=1), ms)
    x = np.stack([r.features() for r in recs])
    coef = nonnegative_lstsq(x, ms)
    return ShapeFit(shape, len(recs), model, scale, _errors(scale * work, ms), (float(a[0]), float(a[1])),
                    _errors(a[0] + a[1] * work, ms), coef, _errors(x @ coef, ms))


# ---------------------------------------------------------------------------------------------------------------
# The DDP step
# ---------------------------------------------------------------------------------------------------------------


def ring_allreduce_seconds(num_bytes: float, n: int, bandwidth: float = BUS_BANDWIDTH) -> float:
    """Ring all-reduce time of ``num_bytes`` over ``n`` GPUs at bus bandwidth ``bandwidth`` (bytes/s)."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * num_bytes / bandwidth


def micro_batch_ms(fit: ShapeFit, mb: bs.MicroBatch) -> float:
    if mb.layout == "padded":
        return fit.predict(mb.lengths, mb.slots - mb.tokens, "padded")
    return fit.predict(mb.lengths, mb.slots - mb.tokens, "flat")  # packed rows: the padding tails are computed


@dataclass
class SimResult:
    efficiency: float
    tokens_per_s_per_gpu: float
    steps: int


def simulate(items: bs.Items, steps: list[bs.Step], fit: ShapeFit, lora_bytes: float,
             bandwidth: float = BUS_BANDWIDTH) -> SimResult:
    """Scaling efficiency of one sampler's plan: serial time of its micro-batches / (n x simulated DDP time)."""
    serial, ddp, tokens = 0.0, 0.0, 0
    for step in steps:
        n = len(step)
        per_rank = []
        for rank in step:
            mbs = [bs.micro_batch(items, mb) for mb in rank]
            per_rank.append(sum(micro_batch_ms(fit, m) for m in mbs) / 1e3)
            tokens += sum(m.tokens for m in mbs)
        serial += sum(per_rank)
        ddp += max(per_rank) + ring_allreduce_seconds(lora_bytes, n, bandwidth)
    n = len(steps[0]) if steps else 1
    return SimResult(serial / (n * ddp) if ddp else 1.0, tokens / (n * ddp) if ddp else 0.0, len(steps))


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal sample lengths (median 600 tokens), for runs without the shared data."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(600), 1.0, n), 16, bs.CAPACITY).astype(np.int64)


def run(timings: Timings, data: np.ndarray, *, world_sizes=WORLD_SIZES, unsloth=None,
        bandwidth: float = BUS_BANDWIDTH, samplers=bs.SAMPLERS) -> tuple[dict[str, ShapeFit], list[list[object]]]:
    """(fits per shape, rows of the efficiency table)."""
    fits = {shape: fit_shape(timings, shape) for shape in sorted({r.shape for r in timings.records})}
    layouts_timed = {shape: {r.layout for r in timings.records if r.shape == shape} for shape in fits}
    table = []
    for layout in bs.LAYOUTS:
        items = bs.layout_items(data, layout)
        needs = "padded" if layout == "padded samples" else "flat"
        for world in world_sizes:
            shared = {name: bs.sampler_steps(name, items, world, unsloth) for name in samplers
                      if not name.startswith("ours")}
            for shape, fit in fits.items():
                lora = float(timings.shapes[shape]["lora_param_bytes"])
                # ours balances the work model of the shape (use_balanced_sampler: WorkModel.for_config)
                plans = {name: shared[name] if name in shared else
                         bs.sampler_steps(name, items, world, unsloth, work_model=timings.work_model(shape))
                         for name in samplers}
                for name, got in plans.items():
                    if needs not in layouts_timed[shape]:
                        table.append([shape, layout, world, name, f"no {needs} timings", ""])
                        continue
                    if got is None:
                        table.append([shape, layout, world, name, "not run", ""])
                        continue
                    res = simulate(items, got[0], fit, lora, bandwidth)
                    table.append([shape, layout, world, name, f"{res.efficiency:.4f}",
                                  f"{res.tokens_per_s_per_gpu:,.0f}"])
    return fits, table


def fit_table(fits: dict[str, ShapeFit]) -> list[list[object]]:
    rows = []
    for f in fits.values():
        e, a, r = f.scale_errors, f.affine_errors, f.refit_errors
        rows.append([
            f.shape, f.n, f"{f.work_model.attn_tokens:,.0f}",
            f"{100 * e['median']:.1f}% / {100 * e['max']:.1f}% (R² {e['r2']:.4f})",
            f"{100 * a['median']:.1f}% / {100 * a['max']:.1f}% (R² {a['r2']:.4f})",
            f"{100 * r['median']:.1f}% / {100 * r['max']:.1f}% (R² {r['r2']:.4f})",
            ", ".join(f"{name} {c:.4g}" for name, c in zip(FEATURES, f.coef)),
            f"{f.implied_attn_tokens:,.0f}", "yes" if f.work_model_off else "no",
        ])
    return rows


def report(timings_path: str, timings: Timings, fits: dict[str, ShapeFit], table: list[list[object]], *,
           data_note: str, unsloth_note: str, bandwidth: float, command: str) -> str:
    lora = ", ".join(f"{k} {int(v['lora_param_bytes']):,} bytes" for k, v in sorted(timings.shapes.items()))
    inputs = "\n".join([
        "**A simulation, not a measurement**: no multi-GPU machine was used. Inputs:",
        "",
        f"- micro-batch timings: `{timings_path}` ({len(timings.records)} records)"
        + (f"; source: {timings.source}" if timings.source else ""),
        f"- LoRA gradient bytes all-reduced per step: {lora}",
        f"- all-reduce: ring, 2 (n-1)/n x bytes / {bandwidth / 1e9:g} GB/s bus bandwidth (NCCL, 1 GiB, two H100s of "
        "one host), not overlapped with the backward",
        f"- data: {data_note}; 8 samples (padded or padding-free) or one packed row of {bs.CAPACITY} per "
        f"micro-batch, gradient accumulation {bs.GRAD_ACCUM}, seed {bs.SEED}, epoch 0, full steps",
        f"- samplers: benchmarks/bench_sampler.py's ({unsloth_note})",
        "- machine header below: the CPU that ran the simulation",
    ])
    fit_header = ["shape", "records", "work model attn_tokens", "work model x scale: median / max error",
                  "+ constant per micro-batch", "refit: median / max error", "refit coefficients (ms)",
                  "refit attn_tokens", "work model off (+ constant: median > 2 x refit's + 0.5%)"]
    sim_header = ["shape", "layout", "GPUs", "sampler", "predicted scaling efficiency", "predicted real tokens/s/GPU"]
    parts = [
        "# Predicted DDP scaling efficiency (simulation)", "",
        machine_header(("numpy", "torch", "transformers"), command=command), "",
        "## Inputs", "", inputs, "",
        "## How well the work model predicts the measured micro-batch times", "",
        "Work = tokens + padded slots + sum(l²) / attn_tokens (what the sampler balances), fitted to the times with "
        "one scale (and with a constant per micro-batch); the refit is non-negative least squares on the features "
        "(constant, slots computed, sum of squared sample lengths, padded attention). Errors are relative, "
        "per micro-batch.", "",
        markdown_table(fit_header, fit_table(fits)), "",
        "## Predicted scaling efficiency", "",
        "Efficiency at n GPUs: one GPU's time for the same micro-batches / (n x the simulated DDP time: per step "
        "the slowest rank's refit time plus the all-reduce). The simulation uses the refit time model.", "",
        markdown_table(sim_header, table), "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timings", help="JSON file of measured micro-batch timings (format in the module docstring)")
    parser.add_argument("--out", default=str(RESULTS / "scaling_sim.md"), help="markdown report to write")
    parser.add_argument("--data", default="shared",
                        help="'shared' (the shared chat datasets pooled) or 'synthetic:N' (N lognormal lengths)")
    parser.add_argument("--bus-bandwidth", type=float, default=BUS_BANDWIDTH, help="all-reduce bus bandwidth, B/s")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(WORLD_SIZES))
    parser.add_argument("--unsloth-src", default=None, help="as in bench_sampler.py")
    parser.add_argument("--unsloth-import", action="store_true", help="as in bench_sampler.py")
    args = parser.parse_args(argv)
    timings = load_timings(args.timings)
    if args.data == "shared":
        data = bs.datasets()["all (pooled)"]
        data_note = f"the four shared chat datasets pooled ({len(data):,} samples, Qwen3 chat template)"
    elif args.data.startswith("synthetic:"):
        data = synthetic_lengths(int(args.data.split(":", 1)[1]))
        data_note = f"{len(data):,} synthetic lognormal lengths (median 600)"
    else:
        parser.error(f"--data {args.data!r}: give 'shared' or 'synthetic:N'")
    unsloth = bs.unsloth_module(args.unsloth_src, args.unsloth_import)
    unsloth_note = f"Unsloth's not run: {unsloth}" if isinstance(unsloth, str) else \
        f"Unsloth {bs.unsloth_version(unsloth)}'s balance_step_indices"
    fits, table = run(timings, data, world_sizes=tuple(args.world_sizes), unsloth=unsloth,
                      bandwidth=args.bus_bandwidth)
    command = "python benchmarks/sim_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args.timings, timings, fits, table, data_note=data_note, unsloth_note=unsloth_note,
                  bandwidth=args.bus_bandwidth, command=command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
