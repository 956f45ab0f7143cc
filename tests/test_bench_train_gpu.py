"""benchmarks/bench_train_gpu.py on the CPU: the torchrun path (2 ranks, gloo), the FLOPs count behind its MFU
column, and the speed-up columns of its table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(shared_data, tmp_path, *extra: str, steps: int = 1, samples: int = 64, backend: str = "hf") -> list[str]:
    """bench_train_gpu.py's arguments for the CPU smoke shape (2 rows of 256 per micro-batch, 1 warm-up step)."""
    return ["--shapes", "cpu_tiny", "--backend", backend, "--micro_rows", "2", "--warmup_steps", "1", "--steps",
            str(steps), "--num_samples", str(samples), "--eval_samples", "4", "--work_dir", str(tmp_path),
            "--data_dir", str(shared_data / "chat"), "--tokenizer", str(shared_data / "tokenizers" / "qwen3"), *extra]


def tiny_config(bench, shared_data, tmp_path, steps: int = 1):
    """The BenchConfig of `tiny_args`, with its data prepared."""
    cfg = bench.build_config(bench.parse_args(tiny_args(shared_data, tmp_path, steps=steps)))
    cfg.data_info = bench.prepare_data(cfg)
    return cfg


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.bench_train_gpu as bench

    return bench


@pytest.mark.integration
def test_bench_runs_under_torchrun_with_two_ranks(shared_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"),
           *tiny_args(shared_data, tmp_path, "--nproc", "2", "--timeout", "300")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert result["world"] == 2 and result["steps"] == 2 and result["layout"] == "rows"
    # 2 rows of 256 slots per rank and micro-batch, one timed step, two ranks
    assert result["slots"] == 2 * 2 * 256
    assert 0.5 * result["slots"] < result["real_tokens"] <= result["slots"]
    assert result["tokens_per_s"] > 0 and result["eval_loss"] > 0
    assert "| cpu_tiny | hf_opensloth | rows | 2 rows x 1 |" in proc.stdout
    assert result["prime"].startswith("512 tokens in 2 rows (rows)")  # each rank primed with full rows first
    assert "- prime: one untimed step per process" in proc.stdout


def test_prime_rows_are_full_and_keep_the_real_documents(bench):
    from datasets import Dataset

    rows = Dataset.from_list([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
        {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [1, 2, 3, 4, 5, 6, 7, 8], "seq_lengths": [8]},
        {"input_ids": [4], "labels": [4], "seq_lengths": [1]},
    ])
    out = bench.full_rows(rows, 2, 8)
    assert len(out) == 2
    first, second = out
    assert first["seq_lengths"] == [3, 2, 3] and len(first["input_ids"]) == len(first["labels"]) == 8
    assert first["input_ids"][:5] == [5, 6, 7, 8, 9] and first["labels"][:5] == [-100, 6, 7, -100, 9]
    assert first["labels"][5:] == first["input_ids"][5:]  # the filler document is trained, as a real one would be
    assert second == {"input_ids": list(range(1, 9)), "labels": list(range(1, 9)), "seq_lengths": [8]}
    with pytest.raises(ValueError, match="needs 4"):
        bench.full_rows(rows, 4, 8)
    with pytest.raises(ValueError, match="above the capacity 4"):
        bench.full_rows(rows, 1, 4)


@pytest.mark.parametrize("shape", ["qwen3_0.6b", "llama31_8b", "small_gemma2"])
def test_matmul_params_count_every_linear_weight(bench, shape):
    """The FLOPs count's weights equal a walk over the model's Linear layers (built on the meta device)."""
    import transformers

    family, params = bench.SHAPES[shape]
    config_cls, model_cls = bench.FAMILIES[family]
    config = getattr(transformers, config_cls)(**params)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    walked = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_params(config) == walked
    if shape == "qwen3_0.6b":  # 28 blocks of 15.7M + the 155.6M LM head
        assert bench.matmul_params(config) == 28 * 15_728_640 + 151_936 * 1024


def test_flops_per_token_adds_lora_and_causal_attention(bench):
    import transformers

    config = transformers.Qwen3Config(**bench.SHAPES["qwen3_0.6b"][1])
    base = bench.flops_per_token(config, 0.0, 0)
    assert base == 4 * bench.matmul_params(config)
    # one causal pair per token costs 4 x layers x heads x head_dim forward, x3 with the backward
    assert bench.flops_per_token(config, 1.0, 0) - base == 12 * 28 * 16 * 128
    assert bench.flops_per_token(config, 0.0, 1000) - base == 6000
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench.peak_tflops("Tesla T4") is None


def _result(shape, variant, tokens_per_s, median=None):
    return {"shape": shape, "variant": variant, "layout": "flat", "batch": 8, "accum": 1, "tokens_per_s": tokens_per_s,
            "tokens_per_s_median": median, "wasted": 0.0, "peak_gb": 1.0, "warmup": 1, "timed_steps": 2,
            "loss_end": 1.0, "eval_loss": 1.0, "mfu": 0.25}


def test_table_compares_with_the_same_shapes_anchors(bench):
    table = bench.results_table([
        _result("a", "unsloth_packing", 100.0), _result("a", "unsloth_auto", 50.0), _result("a", "opensloth", 110.0),
        _result("b", "unsloth_packing", 200.0), _result("b", "opensloth", 180.0),
        {"shape": "b", "variant": "opensloth_padding_free", "error": "rc 1"}])
    assert "| a | opensloth | flat | 8 rows x 1 | 110 | - | 1.100x | 2.200x | 25.0% |" in table
    assert "| b | opensloth | flat | 8 rows x 1 | 180 | - | 0.900x | - |" in table
    assert "| b | opensloth_padding_free | failed: rc 1 |" in table


def test_a_repeated_anchor_is_labelled_and_its_last_run_is_the_reference(bench):
    variants = ["unsloth_packing", "unsloth_auto", "opensloth", "unsloth_packing"]
    assert [bench._run_label(variants, i) for i in range(4)] == [
        "unsloth_packing", "unsloth_auto", "opensloth", "unsloth_packing #2"]
    table = bench.results_table([
        _result("a", "unsloth_packing", 80.0, median=95.0), _result("a", "unsloth_auto", 50.0),
        _result("a", "opensloth", 99.0, median=100.0), _result("a", "unsloth_packing #2", 100.0, median=101.0)])
    assert "| a | opensloth | flat | 8 rows x 1 | 99 | 100 | 0.990x | 1.980x |" in table
    assert "| a | unsloth_packing | flat | 8 rows x 1 | 80 | 95 | 0.800x |" in table  # the cold first run
    assert "| a | unsloth_packing #2 | flat | 8 rows x 1 | 100 | 101 | 1.000x |" in table


def test_median_step_rate_ignores_one_slow_step(bench):
    tokens, seconds = [1000, 1000, 1000, 1000, 1000], [1.0, 1.0, 4.0, 1.0, 1.0]
    assert sum(tokens) / sum(seconds) == 625.0
    assert bench._median_rate(tokens, seconds) == 1000.0
    assert bench._median_rate([100, 300], [1.0, 1.0]) == 200.0
    assert math.isnan(bench._median_rate([], []))


def test_each_step_is_credited_with_the_tokens_it_trains(bench, tmp_path):
    """The data loader collates one batch ahead; the last step (one row, no padding) must still get its own tokens."""
    from transformers import Trainer, TrainingArguments

    from tests._models import tiny_qwen3

    lengths = [7, 12, 5, 9, 11]
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]

    def pad(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), width, dtype=torch.long)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                             logging_steps=100, seed=0)
    trainer = Trainer(model=tiny_qwen3().train(), args=args, train_dataset=rows, data_collator=pad)
    counter = bench._Counter()
    counter.instrument(trainer)
    timer = bench._timer_class()(counter, False)
    trainer.add_callback(timer)
    trainer.train()
    assert len(timer.real) == 3
    assert sum(timer.real) == sum(lengths)
    assert timer.real[-1] == timer.slots[-1] and timer.real[-1] in lengths  # one row alone: nothing padded
    assert all(r > 0 for r in timer.real[:2]) and all(s >= r for r, s in zip(timer.real, timer.slots))


def test_too_little_data_for_the_timed_steps_is_refused(bench):
    cfg = bench.BenchConfig(shapes=["qwen3_8b"], variants=["unsloth_packing", "opensloth"], tokenizer_dir="",
                            data_dir="", work_dir="", out_dir="", data_info={"n_rows": 84, "n_samples": 1500},
                            warmup_steps=2, steps=4, micro_rows=16, grad_accum=1, nproc=1, num_samples=1500)
    with pytest.raises(SystemExit, match=r"need 96 packed rows and 5% spare; 1500 samples make 84: pass --num_samples"):
        bench.check_enough_data(cfg)
    cfg.micro_rows = 13  # 78 rows and 5% spare fit in 84
    bench.check_enough_data(cfg)
    cfg.profile_steps = 1  # profiled steps train data too: 7 x 13 = 91 rows
    with pytest.raises(SystemExit, match=r"7 steps x 1 x 1 ranks need 91 packed rows"):
        bench.check_enough_data(cfg)
    cfg.profile_steps = 0
    cfg.variants.append("unsloth_auto")  # 6 micro-batches of 300 samples: 1,800 of 1,500
    cfg.padded_batch = 300
    with pytest.raises(SystemExit, match=r"need 1800 samples"):
        bench.check_enough_data(cfg)
    cfg.padded_batch = 0  # as many samples as 13 rows hold on average: 232 per micro-batch, 1,392 in all
    bench.check_enough_data(cfg)


def test_token_counting_refuses_a_trainer_it_would_miscount(bench):
    from types import SimpleNamespace

    for args in (SimpleNamespace(dataloader_num_workers=2, eval_strategy="no"),
                 SimpleNamespace(dataloader_num_workers=0, eval_strategy="steps")):
        with pytest.raises(ValueError, match="dataloader_num_workers=0 and no evaluation"):
            bench._Counter().instrument(SimpleNamespace(args=args))


_FAKE_WORKER = """
import json, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(out / "s.json").write_text(json.dumps([{"shape": "s", "variant": "a", "tokens_per_s": 1.0}]))
(out / "pids").write_text(f"{__import__('os').getpid()} {child.pid}")
time.sleep(600)
"""

_ORCHESTRATOR = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
import benchmarks.bench_train_gpu as bench
out = Path(sys.argv[1])
bench.worker_command = lambda cfg_path, shapes, nproc: [sys.executable, str(out / "worker.py"), str(out)]
bench.interrupt_on_sigterm()
cfg = SimpleNamespace(out_dir=str(out), nproc=1, timeout=600, variants=["a", "b"])
print("RESULTS " + json.dumps(bench.run_shapes(cfg, out / "config.json", ["s"])))
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_stopped_benchmark_stops_its_worker_and_keeps_what_finished(tmp_path):
    """`timeout` stops the orchestrator with SIGTERM; its worker runs in a session of its own, so without the handler
    it trained on (seen on the GPU: the next call's benchmark ran beside it)."""
    import time

    (tmp_path / "worker.py").write_text(_FAKE_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _ORCHESTRATOR, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))
    pids_file = tmp_path / "pids"
    deadline = time.monotonic() + 60
    while not pids_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_file.exists(), proc.communicate(timeout=30)[0]
    worker, grandchild = (int(p) for p in pids_file.read_text().split())
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    results = json.loads(out.split("RESULTS ", 1)[1])
    assert [r["variant"] for r in results] == ["a", "b"]
    assert "error" not in results[0] and results[1]["error"] == "rc interrupted"
    deadline = time.monotonic() + 10
    while (_running(worker) or _running(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker) and not _running(grandchild)


def test_step_tokens_marks_each_new_largest_micro_batch(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.step_tokens import growth_steps

    assert growth_steps([65528, 65509, 65528, 65531, 65269]) == [1, 4]  # a tie is not a new largest
    assert growth_steps([3, 3, 5, 4, 6]) == [1, 3, 5]
    assert growth_steps([]) == []


@pytest.mark.integration
def test_step_tokens_reads_each_variants_micro_batches_from_the_trainer(bench, shared_data, tmp_path, capsys):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from benchmarks import step_tokens

    cfg = tiny_config(bench, shared_data, tmp_path, steps=2)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    rows = load_from_disk(cfg.data_info["rows"])
    row_tokens = sorted(sum(r) for r in rows["seq_lengths"])
    sample_tokens = sum(len(x) for x in load_from_disk(cfg.data_info["train"])["input_ids"])

    ours = step_tokens.variant_tokens(cfg, "opensloth", tokenizer)  # the whole epoch, 2 rows per micro-batch
    assert sum(ours) == sum(row_tokens) and len(ours) == -(-len(row_tokens) // 2)
    assert all(t <= 2 * cfg.max_seq_length for t in ours)
    cfg.micro_rows = 1  # one row per micro-batch: the micro-batches are the rows, in some order
    assert sorted(step_tokens.variant_tokens(cfg, "opensloth", tokenizer)) == row_tokens
    cfg.micro_rows = 2
    trl_rows = step_tokens.variant_tokens(cfg, "unsloth_packing", tokenizer)
    assert sum(trl_rows) == sample_tokens and all(t <= 2 * cfg.max_seq_length for t in trl_rows)
    auto = step_tokens.variant_tokens(cfg, "unsloth_auto", tokenizer)
    assert sum(auto) == sample_tokens and len(auto) == -(-cfg.data_info["n_samples"] // bench.padded_batch(cfg))
    assert step_tokens.variant_tokens(cfg, "unsloth_auto", tokenizer, 2) == auto[:2]

    cfg.variants = ["unsloth_packing", "opensloth"]
    assert bench.prime_size(cfg) == 2 * cfg.max_seq_length  # packed variants only: micro_rows full rows
    cfg.variants = ["unsloth_auto", "opensloth"]
    assert bench.prime_size(cfg) == max(2 * cfg.max_seq_length, max(auto))

    # the unsloth backend's variant names (the hf backend has only hf_opensloth); nothing here loads Unsloth
    assert step_tokens.main(tiny_args(shared_data, tmp_path, "--variants", "unsloth_packing,opensloth", steps=2,
                                      backend="unsloth")) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("opensloth"))
    assert line.split("; a new largest")[0].split()[1:] == [f"{t:,}," for t in ours[:2]] + [f"{ours[2]:,}"]
    assert any(x.strip().startswith("unsloth_packing") for x in out.splitlines())


@pytest.mark.integration
def test_profiled_steps_come_after_the_timed_ones_and_write_a_report(shared_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"),
           *tiny_args(shared_data, tmp_path, "--profile_steps", "2", "--timeout", "300", "--no_prime", steps=2,
                      samples=96)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert result["steps"] == 1 + 2 + 2 and result["timed_steps"] == 2 and len(result["step_s"]) == 2
    assert result.get("prime") is None and "untimed step" not in proc.stdout  # --no_prime
    report = (tmp_path / "runs" / "cpu_tiny_hf_opensloth_profile.txt").read_text()
    assert report.startswith("profiled 2 steps: wall ")
    cpu_table = report.split("by self CPU time\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert cpu_table and any("aten::" in line for line in cpu_table)


def test_each_variant_starts_from_the_flags_the_model_was_loaded_with(bench):
    """Our dense-mask route sets Unsloth's keep-the-mask flag on the model and keeps it; an anchor run after it must
    not inherit it (it would keep a padding mask Unsloth drops for its users)."""
    from opensloth.patching.unsloth_mask import keep_unsloth_attention_mask
    from tests._models import tiny_qwen3

    model = tiny_qwen3()
    backbone = model.model
    as_loaded = bench._model_flags_as_loaded(model)
    assert "_unsloth_keep_padding_mask" not in backbone.__dict__
    keep_unsloth_attention_mask(model)  # what wire_batches' masked_rows route does, and keeps
    assert backbone._unsloth_keep_padding_mask is True
    as_loaded()
    assert "_unsloth_keep_padding_mask" not in backbone.__dict__

    backbone._unsloth_keep_padding_mask = False  # a flag that was there at load is put back as it was
    as_loaded = bench._model_flags_as_loaded(model)
    keep_unsloth_attention_mask(model)
    as_loaded()
    assert backbone._unsloth_keep_padding_mask is False

    no_backbone = torch.nn.Linear(2, 2)
    bench._model_flags_as_loaded(no_backbone)()  # nothing to keep: a no-op


def test_route_counters_see_unsloth_packed_calls_and_new_compiled_graphs(bench, monkeypatch):
    import types

    stats = {"fast": 3, "fallback": 0, "compiled": 1}
    monkeypatch.setitem(sys.modules, "unsloth.utils.hf_packed_attention",
                        types.SimpleNamespace(HF_PACKED_ATTENTION_STATS=stats))
    before = bench.route_counters()
    assert before["hf_packed.fast"] == 3 and before["hf_packed.compiled"] == 1
    stats["fast"] += 12  # a step of 6 layers, forward and recompute, outside compiled blocks
    compiled = torch.compile(lambda x: x.sin() * 2 + x.shape[0], backend="eager")
    compiled(torch.ones(5))
    after = bench.route_counters()
    assert after["hf_packed.fast"] - before["hf_packed.fast"] == 12
    assert after["hf_packed.fallback"] == before["hf_packed.fallback"]
    assert after["dynamo.stats.unique_graphs"] > before.get("dynamo.stats.unique_graphs", 0)


def test_a_short_last_prime_row_keeps_whole_documents(bench):
    from datasets import Dataset

    rows = Dataset.from_list([
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [1, 2, 3, 4, 5, 6], "seq_lengths": [2, 4]},
        {"input_ids": [7, 8, 9, 10, 11, 12, 13], "labels": [7, 8, 9, 10, 11, 12, 13], "seq_lengths": [3, 4]},
    ])
    first, second = bench.full_rows(rows, 2, 8, last=5)
    assert first["seq_lengths"] == [2, 4, 2] and len(first["input_ids"]) == 8
    assert second["seq_lengths"] == [3, 2] and second["input_ids"][:3] == [7, 8, 9]  # the 4-token document dropped
    assert len(second["input_ids"]) == len(second["labels"]) == 5
    (only,) = bench.full_rows(rows, 1, 8, last=1)
    assert only["seq_lengths"] == [1] and len(only["input_ids"]) == 1  # no real document fits: all filler
    with pytest.raises(ValueError, match=r"last = 9 must be in \[1, capacity = 8\]"):
        bench.full_rows(rows, 1, 8, last=9)


@pytest.mark.integration
def test_a_failed_prime_is_reported_and_the_variants_still_run(bench, shared_data, tmp_path, monkeypatch):
    cfg = tiny_config(bench, shared_data, tmp_path)
    Path(cfg.out_dir).mkdir(parents=True)
    bench.build_random_model(cfg, "cpu_tiny")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(bench._SETUP, "device", torch.device("cpu"))

    def out_of_memory(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(bench, "_prime", out_of_memory)
    bench._run_shape_here(cfg, "cpu_tiny")
    (result,) = json.loads((Path(cfg.out_dir) / "cpu_tiny.json").read_text())
    assert "error" not in result and result["steps"] == 2 and result["tokens_per_s"] > 0
    assert result["prime"] == "failed (RuntimeError: CUDA out of memory (a stand-in)), variants unprimed"
    assert "failed (RuntimeError" in bench.setup_lines(cfg, [result])

    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the other ranks would wait: the shape fails at once
    monkeypatch.setattr(bench, "_dist_info", lambda: (0, 2, 0))
    with pytest.raises(RuntimeError, match="a stand-in"):
        bench._run_shape_here(cfg, "cpu_tiny")


@pytest.mark.parametrize("flag, expected, label", [
    ((), "unsloth", "Unsloth gradient checkpointing (offloaded)"),
    (("--gradient_checkpointing", "gpu"), True, "gradient checkpointing on the GPU"),
    (("--gradient_checkpointing", "off"), False, "no gradient checkpointing")])
def test_gradient_checkpointing_reaches_unsloth_and_the_report(bench, shared_data, tmp_path, monkeypatch, flag,
                                                               expected, label):
    """Unsloth's offloaded checkpointing by default; `--gradient_checkpointing gpu` asks Unsloth's LoRA set-up for
    plain checkpointing and `off` for none (the MFU study at 8B), and the setup lines say which."""
    import types

    cfg = bench.build_config(bench.parse_args(tiny_args(shared_data, tmp_path, *flag, backend="unsloth")))
    cfg.data_info = bench.prepare_data(cfg)
    seen = {}

    class FastLanguageModel:  # a stand-in: Unsloth does not import without a GPU
        @staticmethod
        def from_pretrained(path, **kwargs):
            return "model", "tokenizer"

        @staticmethod
        def get_peft_model(model, **kwargs):
            seen.update(kwargs)
            return model

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    assert bench._load(cfg, "cpu_tiny", 0) == ("model", "tokenizer")
    asked = seen["use_gradient_checkpointing"]
    assert asked == expected and type(asked) is type(expected)  # True is not "unsloth", False is not "off"
    lines = bench.setup_lines(cfg, [])
    assert label in lines
    assert sum(other in lines for other in bench.GRADIENT_CHECKPOINTING_LABEL.values()) == 1
