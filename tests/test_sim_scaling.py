"""benchmarks/sim_scaling.py on synthetic timings: the refit recovers a known time model, the work model check flags
a wrong attention weight, the all-reduce follows the ring formula, and the simulated efficiencies are sane."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The true time model of the synthetic GPU: ms = C0 + C_SLOTS x slots + C_ATTN x sum(l^2) + C_PAD x padded attention
C0, C_SLOTS, C_ATTN, C_PAD = 0.4, 1e-4, 2e-8, 1.5e-8
LORA_BYTES = 40_000_000


@pytest.fixture(scope="module")
def sim():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks import sim_scaling

    return sim_scaling


def _true_ms(sim, lengths, padded, layout):
    return float(sim.features(np.asarray(lengths), padded, layout) @ np.asarray([C0, C_SLOTS, C_ATTN, C_PAD]))


def _timings(sim, attn_tokens=None, padded=True) -> dict:
    rng = np.random.default_rng(0)
    records = []
    for _ in range(40):
        lengths = rng.integers(50, 4000, rng.integers(1, 9)).tolist()
        records.append({"shape": "small", "lengths": lengths, "padded_slots": 0, "layout": "flat",
                        "ms": _true_ms(sim, lengths, 0, "flat")})
        if not padded:
            continue
        pad = max(lengths) * len(lengths) - sum(lengths)
        records.append({"shape": "small", "lengths": lengths, "padded_slots": pad, "layout": "padded",
                        "ms": _true_ms(sim, lengths, pad, "padded")})
    shape = {"shape": "small", "lora_param_bytes": LORA_BYTES}
    if attn_tokens is not None:
        shape["attn_tokens"] = attn_tokens
    return {"source": "synthetic", "records": records, "shapes": [shape]}


def _load(sim, tmp_path, payload, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return sim.load_timings(path)


def test_refit_recovers_the_time_model_and_flags_a_wrong_work_model(sim, tmp_path):
    right = sim.fit_shape(_load(sim, tmp_path, _timings(sim, attn_tokens=C_SLOTS / C_ATTN)), "small")
    np.testing.assert_allclose(right.coef, [C0, C_SLOTS, C_ATTN, C_PAD], rtol=1e-6)
    assert right.refit_errors["max"] < 1e-9 and right.implied_attn_tokens == pytest.approx(5000)
    # On padding-free micro-batches the work model with the right attention weight is the time model up to the
    # constant per micro-batch; with the default weight (53,248 tokens, an 8B layer) it is off.
    right = sim.fit_shape(_load(sim, tmp_path, _timings(sim, attn_tokens=5000, padded=False)), "small")
    assert right.affine == pytest.approx((C0, C_SLOTS)) and right.affine_errors["max"] < 1e-9
    wrong = sim.fit_shape(_load(sim, tmp_path, _timings(sim, padded=False)), "small")
    assert wrong.work_model.attn_tokens == pytest.approx(53_248)
    assert not right.work_model_off and wrong.work_model_off and wrong.affine_errors["max"] > 0.05
    assert right.n == wrong.n == 40
    assert sim.fit_shape(_load(sim, tmp_path, _timings(sim)), "small").n == 80
    rows = sim.fit_table({"small": wrong})
    assert rows[0][-1] == "yes" and "5,000" in rows[0][-2]


def test_flat_list_input_and_validation(sim, tmp_path):
    payload = _timings(sim)
    flat = payload["records"] + payload["shapes"]
    assert len(_load(sim, tmp_path, flat).records) == len(payload["records"])
    bad = json.loads(json.dumps(payload))
    bad["shapes"] = []
    with pytest.raises(ValueError, match=r"shapes \['small'\] have timings but no"):
        _load(sim, tmp_path, bad)
    bad = json.loads(json.dumps(payload))
    bad["records"][0]["layout"] = "rows"
    with pytest.raises(ValueError, match=r"records\[0\].layout = 'rows'"):
        _load(sim, tmp_path, bad)


def test_ring_allreduce(sim):
    assert sim.ring_allreduce_seconds(2**30, 1) == 0.0
    assert sim.ring_allreduce_seconds(2**30, 2) == pytest.approx(2**30 / 329e9)
    assert sim.ring_allreduce_seconds(2**30, 8) == pytest.approx(2 * 7 / 8 * 2**30 / 329e9)


def test_simulated_efficiency(sim, tmp_path):
    from benchmarks import bench_sampler as bs

    timings = _load(sim, tmp_path, _timings(sim, attn_tokens=5000))
    fit = sim.fit_shape(timings, "small")
    data = sim.synthetic_lengths(1500)
    eff, balance = {}, {}
    for layout in ("unpacked padding-free", "packed rows"):
        items = bs.layout_items(data, layout)
        for name in ("round-robin", "ours"):
            steps, _ = bs.sampler_steps(name, items, 4, work_model=timings.work_model("small"))
            eff[layout, name] = sim.simulate(items, steps, fit, LORA_BYTES).efficiency
            balance[layout, name] = sim.simulate(items, steps, fit, 0).efficiency  # the ranks' waiting alone
            slow = sim.simulate(items, steps, fit, LORA_BYTES, bandwidth=1e6)  # a slow all-reduce costs time
            assert slow.efficiency < eff[layout, name]
            # one rank: no all-reduce, no waiting
            one, _ = bs.sampler_steps(name, items, 1)
            assert sim.simulate(items, one, fit, LORA_BYTES).efficiency == pytest.approx(1.0)
    assert all(0 < e <= 1 for e in eff.values())
    assert eff["unpacked padding-free", "ours"] > eff["unpacked padding-free", "round-robin"]
    # this synthetic GPU's micro-batches take ~1 ms, so the 0.18 ms all-reduce of 40 MB costs a few percent
    assert balance["unpacked padding-free", "ours"] >= 0.99 > balance["unpacked padding-free", "round-robin"]
    assert balance["packed rows", "ours"] >= balance["packed rows", "round-robin"]


def test_cli_writes_a_labelled_report(sim, tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(_timings(sim, attn_tokens=5000)))
    out = sim.main([str(path), "--out", str(tmp_path / "sim.md"), "--data", "synthetic:600", "--world-sizes", "2",
                    "--unsloth-src", str(tmp_path / "no_unsloth_here")])
    text = out.read_text()
    assert "simulation" in text.lower() and "329 GB/s" in text and str(path) in text
    assert "40,000,000 bytes" in text
    table = [line for line in text.splitlines() if line.startswith("| small |")]
    assert len(table) == 1 + 3 * 5  # the fit row, then 3 layouts x 5 samplers at 2 GPUs
    assert sum("not run" in line for line in table) == 3  # Unsloth's rows, without its source
