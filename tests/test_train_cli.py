"""`opensloth train`'s command line (opensloth/cli/train.py; train_scripts/train_configurable.py is a wrapper over
it): defaults, validation, preset resolution, config printing, the console command and the wrapper."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "train_configurable.py"


@pytest.fixture(scope="module")
def cli():
    import opensloth.cli.train as module

    return module


@pytest.fixture(scope="module")
def wrapper():
    """train_scripts/train_configurable.py loaded by path, as the seed's users and older tests did."""
    spec = importlib.util.spec_from_file_location("train_configurable_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _error(cli, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--per_device_batch_size", "0"], "--per_device_batch_size"),
    (["--per_device_batch_size", "-3"], "--per_device_batch_size"),
    (["--grad_accum", "0"], "--grad_accum"),
    (["--max_seq_length", "0"], "--max_seq_length"),
    (["--train_samples", "0"], "--train_samples"),
    (["--test_samples", "-1"], "--test_samples"),
    (["--num_epochs", "0"], "--num_epochs"),
    (["--max_steps", "0"], "--max_steps"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "-1e-4"], "--learning_rate"),
    (["--save_steps", "0"], "--save_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--lora_r", "-1"], "--lora_r"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--backend", "tensorflow"], "--backend"),
    (["--packing", "zip"], "--packing"),
    (["--save_strategy", "hourly"], "--save_strategy"),
    (["--per_device_batch_size", "two"], "--per_device_batch_size"),
    (["--skip_prepare"], "--prepared_dataset_path"),
    (["--skip_prepare", "--prepared_dataset_path", "/nonexistent/opensloth/prepared"], "--prepared_dataset_path"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "--resume_from_checkpoint"),
    (["--preset", "huge"], "--preset"),
    (["--preset", "tiny", "--model_name", "Qwen/Qwen3-0.6B"], "--model_name"),
    (["--use_patches", "--no_patches"], "--no_patches"),
    (["--experiment_name", "a/b"], "--experiment_name"),
    (["--debug_dataloader", "-1"], "--debug_dataloader"),
    (["--report_to", "tensorbord"], "--report_to"),
    (["--report_to", "none,tensorboard"], "--report_to"),
    (["--lora_targets", "q-proj"], "--lora_targets"),
    (["--attn_implementation", "flash_attn"], "--attn_implementation"),
    (["--eval_strategy", "steps", "--test_samples", "0"], "--eval_strategy"),
    (["--eval_steps", "5"], "--eval_steps"),
    (["--save_steps", "5"], "--save_steps"),
    (["--lr_scheduler_type", "cosin"], "--lr_scheduler_type"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type"),  # needs lr_scheduler_kwargs
    (["--max_seq_length", "3"], "--max_seq_length"),
    (["--lora_r", "0", "--lora_targets", "q_proj"], "--lora_targets"),
    (["--lora_r", "0", "--lora_alpha", "32"], "--lora_alpha"),
    (["--model_name", "/nonexistent/opensloth/model"], "--model_name"),
    (["--model_name", "./my-model"], "--model_name"),
])
def test_bad_flags_are_argparse_errors_naming_the_flag(cli, capsys, argv, flag):
    err = _error(cli, capsys, argv)
    assert f"argument {flag}" in err
    assert "usage:" in err


def test_the_scheduler_choices_are_transformers_schedules_that_need_no_extra_arguments(cli):
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    from opensloth.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    for name in LR_SCHEDULERS:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
        optimizer.step()
        scheduler.step()


def test_a_model_folder_must_hold_a_model(cli, capsys, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    err = _error(cli, capsys, ["--model_name", str(tmp_path / "tok")])
    assert "argument --model_name" in err and "holds no config.json" in err
    (tmp_path / "weights.bin").write_text("x")
    assert "is a file" in _error(cli, capsys, ["--model_name", str(tmp_path / "weights.bin")])
    for kept in ("config.json", "adapter_config.json"):  # a model, or a LoRA adapter over one
        folder = tmp_path / kept.split(".")[0]
        folder.mkdir()
        (folder / kept).write_text("{}")
        config, _ = cli.parse_args(["--model_name", str(folder)])
        assert config.model_name == str(folder)
    config, _ = cli.parse_args(["--model_name", "Qwen/Qwen3-0.6B"])  # a hub name is checked when loaded
    assert config.model_name == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize("flag", [["--dataset", "synthetic"], ["--all_tokens"], ["--on_error", "skip"],
                                  ["--dataset_num_proc", "2"]])
def test_data_preparation_flags_conflict_with_a_prepared_dataset(cli, capsys, tmp_path, flag):
    """A prepared dataset is trained as `opensloth precompute` wrote it: a flag that would prepare the data otherwise
    must not be taken silently."""
    err = _error(cli, capsys, ["--prepared_dataset_path", str(tmp_path), *flag])
    assert f"argument {flag[0]}" in err and "precompute" in err


@pytest.mark.parametrize("argv", [["--lr", "1e-3"], ["--per_device", "2"], ["--max_seq", "128"]])
def test_abbreviations_are_not_flags(cli, capsys, argv):
    """argparse's prefix matching would take --lr for --lr_scheduler_type; every flag must be spelled out."""
    err = _error(cli, capsys, argv)
    assert f"unrecognized arguments: {argv[0]}" in err


def test_an_integration_whose_package_is_missing_says_how_to_install_it(cli, capsys, monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    err = _error(cli, capsys, ["--report_to", "wandb"])
    assert "argument --report_to: wandb needs the wandb package" in err and "pip install wandb" in err


def test_flash_attention_2_without_the_package_is_an_argparse_error(cli, capsys, monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    err = _error(cli, capsys, ["--attn_implementation", "flash_attention_2"])
    assert "argument --attn_implementation: flash_attention_2 needs the flash-attn package" in err


def test_gpu_only_attention_on_a_cpu_stops_before_loading(cli):
    config, _ = cli.parse_args(["--attn_implementation", "eager", "--preset", "tiny"])
    cli.check_machine(config, "hf")  # fine anywhere
    config, _ = cli.parse_args(["--attn_implementation", "flex_attention"])
    if cli._cuda_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(cli.RunError, match="flex_attention needs a CUDA GPU"):
        cli.check_machine(config, "hf")


def test_lora_targets_are_checked_against_the_model(cli):
    from tests._models import tiny_qwen3

    model = tiny_qwen3()
    cli.check_lora_targets(model, ["q_proj", "down_proj"], 8)
    cli.check_lora_targets(model, ["nothing"], 0)  # full fine-tuning: no adapters, nothing to check
    with pytest.raises(cli.RunError, match=r"q_prj is not a layer of Qwen3ForCausalLM; .*k_proj.*q_proj"):
        cli.check_lora_targets(model, ["q_prj", "k_proj"], 8)


def test_several_problems_are_all_reported(cli, capsys):
    err = _error(cli, capsys, ["--grad_accum", "0", "--train_samples", "-5"])
    assert "--train_samples" in err and "--grad_accum" in err


def test_seed_defaults(cli):
    config, sources = cli.parse_args([])
    # the seed's train_configurable.py defaults
    assert config.model_name == "unsloth/Qwen3-0.6B-bnb-4bit"
    assert (config.max_seq_length, config.num_epochs, config.train_samples, config.test_samples) == (4096, 5, 1000, 10)
    assert (config.learning_rate, config.per_device_batch_size, config.grad_accum) == (2e-4, 8, 4)
    assert config.experiment_name == "opensloth_sanity"
    assert config.dataset == "trl-lib/Capybara"
    assert (config.lora_r, config.lora_alpha, config.lora_targets) == (8, 16, "q_proj,k_proj,v_proj,o_proj")
    assert config.patches and not config.skip_prepare
    assert config.packing == "padding_free"  # per_device_batch_size counts samples, as in the seed
    assert set(sources.values()) == {"default"}


def test_run_name_and_output_dir(cli):
    config, _ = cli.parse_args(["--experiment_name", "exp"])
    assert config.run_name(1) == "exp_ws1" and config.run_name(4) == "exp_ws4"
    assert config.resolved_output_dir(2) == os.path.join("outputs", "exp_ws2")
    off, _ = cli.parse_args(["--experiment_name", "exp", "--no_patches"])
    assert not off.patches and off.run_name(2) == "exp_ws2_nopatches"
    custom, _ = cli.parse_args(["--output_dir", "/tmp/x"])
    assert custom.resolved_output_dir(8) == "/tmp/x"
    seed_flag, _ = cli.parse_args(["--use_patches"])  # the seed's flag still parses
    assert seed_flag.patches


def test_preset_defaults_apply_only_to_flags_not_given(cli):
    from opensloth.presets import TINY

    config, sources = cli.parse_args(["--preset", "tiny", "--per_device_batch_size", "3"])
    assert config.per_device_batch_size == 3 and sources["per_device_batch_size"] == "flag"
    assert config.learning_rate == TINY.defaults["learning_rate"] and sources["learning_rate"] == "preset"
    assert config.dataset == "synthetic" and config.experiment_name == "tiny"
    assert config.seed == 42 and sources["seed"] == "default"


def test_prepared_path_implies_skip_prepare(cli, tmp_path):
    config, sources = cli.parse_args(["--prepared_dataset_path", str(tmp_path)])
    assert config.skip_prepare and sources["skip_prepare"].startswith("implied")


def test_help_lists_every_setting(cli, capsys):
    from opensloth.config import TrainConfig

    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("internal"):
            assert f"--{f.name}" in out, f.name


def test_print_config(cli, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["--preset", "tiny", "--grad_accum", "3", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OpenSloth training configuration:")
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "tiny_ws2" in out  # run name with the world size from WORLD_SIZE
    assert lines["grad_accum"].split()[1] == "3" and lines["grad_accum"].endswith("[flag]")
    assert "[preset]" in lines["learning_rate"]
    assert "4 x 3 x 2 = 24 samples per step" in out


def test_print_config_imports_no_training_stack():
    """Unsloth must be imported before transformers, trl and peft: parsing and printing import none of them."""
    code = (f"import runpy, sys; sys.argv = ['x', '--preset', 'tiny', '--print_config']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
            f"if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_interval_mean_weights_by_steps(cli):
    history = [{"step": 1, "x": 10.0}, {"step": 5, "x": 20.0}, {"step": 6, "eval_loss": 1.0, "x": 1e6},
               {"step": 10, "x": 40.0}]
    # intervals cover 1, 4 and 5 steps; the evaluation entry is not a training interval
    assert cli._interval_mean(history, "x") == pytest.approx((10 * 1 + 20 * 4 + 40 * 5) / 10)
    assert cli._interval_mean(history, "missing") is None


def test_interval_mean_of_a_resumed_run_counts_the_logged_steps_only(cli):
    """Resumed at step 7 of a run that logged at 1 and 5: the restored history holds those two, the resumed run's
    first log (step 9) covers steps 8-9, and steps 6-7 were never logged."""
    history = [{"step": 1, "loss": 10.0}, {"step": 5, "loss": 20.0}, {"step": 9, "loss": 30.0},
               {"step": 10, "loss": 40.0}]
    assert cli._interval_mean(history, "loss", 7) == pytest.approx((10 * 1 + 20 * 4 + 30 * 2 + 40 * 1) / 8)
    assert cli._interval_mean(history, "loss", 5) == pytest.approx((10 * 1 + 20 * 4 + 30 * 4 + 40 * 1) / 10)


def test_format_summary_shows_the_figures(cli):
    summary = {"run_name": "r_ws2", "world_size": 2, "backend": "hf", "packing": "balanced", "patches": True,
               "global_step": 24, "max_steps": 24, "epoch": 1.0, "resumed_from_step": None,
               "train_runtime_s": 12.5, "wall_time_s": 30.25, "tokens_per_sec_per_gpu": 2994.4,
               "real_token_fraction": 0.987, "rank_work_max_over_mean": 1.004, "first_train_loss": 6.95,
               "first_logged_step": 1, "final_train_loss": 4.25, "final_eval_loss": 3.89, "output_dir": "o"}
    text = cli.format_summary(summary)
    for piece in ("r_ws2", "2 process(es)", "12.5 s training", "2,994", "0.987", "1.004", "6.9500", "4.2500",
                  "3.8900"):
        assert piece in text


@pytest.mark.parametrize("path", ["train_scripts/train_ddp.py", "examples/qwen_sft.py", "train_scripts/"
                                  "train_configurable.py"])
def test_scripts_compile(path, tmp_path):
    py_compile.compile(str(ROOT / path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_summary_file_name_is_stable(cli):
    # scripts/sanity_check_training.sh and the integration tests read this file
    assert cli.SUMMARY_FILE == "run_summary.json"


def test_training_readme_documents_every_flag():
    from opensloth.config import TrainConfig

    text = (ROOT / "TRAINING_README.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("internal"):
            assert f"`--{f.name}`" in text or f"`--{f.name}` /" in text, f.name


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="checks the CPU-only error path")
def test_unsloth_backend_without_cuda_is_a_clear_error(cli, capsys):
    assert cli.main(["--preset", "tiny", "--backend", "unsloth"]) == 2
    err = capsys.readouterr().err
    assert "--backend unsloth" in err and "CUDA" in err and "--backend hf" in err


@pytest.mark.skipif(not _no_cuda(), reason="checks the CPU-only error path")
def test_auto_backend_falls_back_to_transformers_on_cpu(cli):
    assert cli.resolve_backend("auto") == "hf"
    assert cli.resolve_backend("hf") == "hf"
    config, _ = cli.parse_args(["--preset", "tiny", "--backend", "auto"])
    assert cli.check_machine(config) == "hf"  # the one runtime check resolves the backend too


@pytest.mark.skipif(not _no_cuda(), reason="checks the CPU-only error path")
def test_4bit_checkpoint_and_nccl_on_cpu_are_clear_errors(cli):
    config, _ = cli.parse_args(["--backend", "hf"])  # the seed's default model, a bitsandbytes 4-bit checkpoint
    with pytest.raises(cli.RunError, match="needs a CUDA GPU.*--preset tiny"):
        cli.check_machine(config, "hf")
    config, _ = cli.parse_args(["--preset", "tiny", "--ddp_backend", "nccl"])
    with pytest.raises(cli.RunError, match="--ddp_backend nccl needs CUDA GPUs.*gloo"):
        cli.check_machine(config, "hf")


@pytest.mark.skipif(not _no_cuda(), reason="checks the CPU-only error path")
def test_a_machine_problem_stops_main_before_anything_loads(cli, capsys, tmp_path):
    code = cli.main(["--preset", "tiny", "--ddp_backend", "nccl", "--output_dir", str(tmp_path / "out"),
                     "--cache_dir", str(tmp_path / "cache")])
    assert code == 2
    assert "opensloth train: error: --ddp_backend nccl needs CUDA GPUs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unreachable_model_and_dataset_are_clear_errors(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing to fall back on
    config, _ = cli.parse_args(["--backend", "hf", "--model_name", "opensloth-test/no-such-model"])
    with pytest.raises(cli.RunError, match="no-such-model.*--preset tiny"):
        cli.load_model(config, "hf", 0)
    with pytest.raises(cli.RunError, match="--dataset opensloth-test/no-such-data.*--preset tiny"):
        cli.load_records("opensloth-test/no-such-data", 10, 2, 0)


def test_load_records_splits_a_jsonl_file(cli, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(7)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    train, test = cli.load_records(str(path), 5, 10, 0)
    assert [r["id"] for r in train] == ["0", "1", "2", "3", "4"]
    assert [r["id"] for r in test] == ["5", "6"]  # fewer than asked: what is left, with a note
    assert "2 evaluation records left" in capsys.readouterr().out
    train, test = cli.load_records(str(path), 7, 3, 0)
    assert len(train) == 7 and test is None


def test_sanity_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "sanity_check_training.sh")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------------ data (issue 15)


@pytest.fixture(scope="module")
def tiny_tok():
    from opensloth.presets import build_tiny_tokenizer

    return build_tiny_tokenizer(1024, 1024)


def _chat(i: int, question: str = "what is it?", answer: str = "it is fine.") -> dict:
    return {"id": str(i), "messages": [{"role": "user", "content": f"{question} {i}"},
                                       {"role": "assistant", "content": answer}]}


def _write_jsonl(path: Path, rows: list, raw: dict | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, text in (raw or {}).items():
        lines[at] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("spec", ["my_chats.jsonl", "data/chats.json", "./chats", "/nonexistent/opensloth/x",
                                  "a/b/c", "CHATS.PARQUET", "train.csv"])
def test_a_missing_local_dataset_is_file_not_found_at_once(cli, capsys, spec):
    err = _error(cli, capsys, ["--dataset", spec])
    assert "argument --dataset: file not found" in err and repr(spec) in err


def test_hub_names_are_not_taken_for_files(cli, tmp_path, monkeypatch):
    from opensloth.config import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    for spec in ("trl-lib/Capybara", "HuggingFaceH4/ultrachat_200k", "imdb", "synthetic"):
        assert not looks_like_local_path(spec), spec
        cli.parse_args(["--dataset", spec])  # no error: a hub name (checked when loaded) or the generated data
    (tmp_path / "mydata").mkdir()
    assert looks_like_local_path("mydata/missing")  # its first part is a local folder


def test_a_missing_file_leaves_no_cache_debris(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _ = cli.parse_args(["--preset", "tiny", "--cache_dir", str(tmp_path / "cache")])
    config = dataclasses.replace(config, dataset="gone.jsonl")  # the file went away after parsing
    with pytest.raises(cli.RunError, match="--dataset gone.jsonl: file not found"):
        cli.prepare_datasets(config, None, 1)
    with pytest.raises(cli.RunError, match="file not found"):
        cli.load_records("gone.jsonl", 10, 0, 0)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _config(cli, tmp_path, *flags):
    config, _ = cli.parse_args(["--preset", "tiny", "--cache_dir", str(tmp_path / "cache"), *flags])
    return config


def test_bad_records_are_named_by_file_and_line_and_skipped_on_request(cli, tmp_path, tiny_tok):
    rows = [_chat(i) for i in range(40)]
    rows[20] = {"id": "noans", "messages": [{"role": "user", "content": "hi"}]}  # line 21
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    config = _config(cli, tmp_path, "--dataset", str(path))
    records, _ = cli.load_records(str(path), 40, 0, 0)
    with pytest.raises(cli.RunError) as err:
        cli._tokenize_split(config, tiny_tok, records, "train", {})
    msg = str(err.value)
    assert f"{path}:21 (id='noans') has no assistant message" in msg and "--on_error skip" in msg
    skip = dataclasses.replace(config, on_error="skip")
    stats: dict = {}
    ds = cli._tokenize_split(skip, tiny_tok, records, "train", stats)
    assert len(ds) == 39 and stats["opensloth_data_stats"]["train"]["skipped"] == 1
    # a line that is not JSON: file:line too, and skipped with --on_error skip
    _write_jsonl(path, [_chat(i) for i in range(40)], raw={30: "{broken"})
    with pytest.raises(cli.RunError, match=rf"{path}:31 is not valid JSON.*--on_error skip"):
        cli.load_records(str(path), 40, 0, 0)
    train, _ = cli.load_records(str(path), 40, 0, 0, on_error="skip")
    assert len(train) == 39 and train[30].source == f"{path}:32"


def test_records_without_a_conversation_name_what_the_cli_accepts(cli, tmp_path, tiny_tok):
    config = _config(cli, tmp_path, "--dataset", "synthetic")
    with pytest.raises(cli.RunError) as err:
        cli._tokenize_split(config, tiny_tok, [{"id": "x", "text": "hello"}], "train", {})
    msg = str(err.value)
    assert "'prompt' and 'completion'" in msg and "'messages'" in msg and "messages_field=" not in msg
    pc = [{"prompt": f"q{i}", "completion": "a"} for i in range(3)]
    assert len(cli._tokenize_split(config, tiny_tok, pc, "train", {})) == 3


def test_training_data_with_no_trained_token_fails_before_training(cli, tmp_path, tiny_tok, capsys):
    long_q = "please tell me " * 20  # the answer starts far beyond --max_seq_length 32
    path = _write_jsonl(tmp_path / "long.jsonl", [_chat(i, long_q) for i in range(12)])
    config = _config(cli, tmp_path, "--dataset", str(path), "--max_seq_length", "32", "--train_samples", "8",
                     "--test_samples", "4")
    with pytest.raises(cli.RunError) as err:
        cli.prepare_datasets(config, tiny_tok, 1)
    msg = str(err.value)
    assert "none of the 8 training records" in msg and "has a trained token" in msg
    assert "lost every answer to truncation at --max_seq_length 32" in msg
    assert "raise --max_seq_length (above " in msg and "--all_tokens" in msg
    ok, _, _ = cli.prepare_datasets(dataclasses.replace(config, max_seq_length=1024), tiny_tok, 1)
    assert len(ok) == 8


def test_records_and_eval_sets_with_no_trained_token_are_dropped_with_a_message(cli, tmp_path, tiny_tok, capsys):
    long_q = "please tell me " * 20
    rows = [_chat(i, "hi" if i < 5 else long_q) for i in range(8)] + [_chat(i, long_q) for i in range(8, 12)]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = _config(cli, tmp_path, "--dataset", str(path), "--max_seq_length", "40", "--train_samples", "8",
                     "--test_samples", "4")
    for built in (True, False):  # the second call loads the cache the first wrote: same counts, same messages
        train, val, info = cli.prepare_datasets(config, tiny_tok, 1)
        out = capsys.readouterr().out
        assert info["built_here"] is built
        assert len(train) == 5 and val is None
        assert "train: dropped 3 of 8 records that train no token: 3 lost every answer to truncation" in out
        assert "no evaluation: none of the 4 evaluation records" in out
        labels = [np.asarray(x) for x in train["labels"]]
        assert all((x[1:] != -100).any() for x in labels)
        assert info["records"]["train"]["dropped_no_trained"] == 3


def test_an_edit_that_keeps_size_and_time_is_not_served_from_the_cache(cli, tmp_path, tiny_tok):
    """`cp -p`, `rsync -a` or an edit within the same second keep a file's size and modification time: the cache key
    must follow the bytes."""
    path = _write_jsonl(tmp_path / "chats.jsonl", [_chat(i, answer="it is fine.") for i in range(6)])
    config = _config(cli, tmp_path, "--dataset", str(path), "--train_samples", "6", "--test_samples", "0")
    first, _, info = cli.prepare_datasets(config, tiny_tok, 1)
    assert info["built_here"]
    stat = path.stat()
    _write_jsonl(path, [_chat(i, answer="it is good.") for i in range(6)])  # same length, other words
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    edited, _, info = cli.prepare_datasets(config, tiny_tok, 1)
    assert info["built_here"]  # a new key, not the first build's rows
    assert list(edited["input_ids"]) != list(first["input_ids"])
    again, _, info = cli.prepare_datasets(config, tiny_tok, 1)
    assert not info["built_here"] and list(again["input_ids"]) == list(edited["input_ids"])


# ------------------------------------------------------------------------------------------------ output folder


def _fake_run(folder: Path, cli, config, world_size: int = 1) -> None:
    """What a run leaves: a checkpoint, events, the summary and its stored configuration."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "runs" / "x").mkdir(parents=True)
    (folder / "runs" / "x" / "events.out.tfevents.1.host.1.0").write_text("e")
    (folder / cli.SUMMARY_FILE).write_text("{}")
    (folder / "model.safetensors").write_text("m")
    cli.start_output_dir(config, {}, str(folder), world_size)


def test_a_new_run_refuses_a_folder_that_holds_a_run(cli, tmp_path):
    out = tmp_path / "out"
    config = _config(cli, tmp_path, "--output_dir", str(out))
    cli.check_output_dir(config, str(out), 1, None)  # missing: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cli.check_output_dir(config, str(out), 1, None)  # a folder without a run: fine
    _fake_run(out, cli, config)
    assert cli.run_artifacts(out) == ["checkpoint-2", cli.SUMMARY_FILE, cli.CONFIG_FILE, "runs/"]
    with pytest.raises(cli.RunError) as err:
        cli.check_output_dir(config, str(out), 1, None)
    msg = str(err.value)
    assert f"{out} already holds a run (checkpoint-2" in msg
    for flag in ("--resume_from_checkpoint latest", "--experiment_name", "--output_dir", "--overwrite_output_dir"):
        assert flag in msg
    over = dataclasses.replace(config, overwrite_output_dir=True)
    cli.check_output_dir(over, str(out), 1, None)
    cli.start_output_dir(over, {}, str(out), 1)
    assert sorted(p.name for p in out.iterdir()) == sorted([cli.CONFIG_FILE, "notes.txt"])  # only the old run gone


def test_resume_latest_points_at_the_run_of_another_world_size(cli, tmp_path, monkeypatch):
    """The default run folder is named after the world size, so `latest` on 2 processes looks in <name>_ws2; a
    checkpoint the 1-process run wrote is named in the error, with the flag that continues it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "exp_ws1" / "checkpoint-3").mkdir(parents=True)
    config, _ = cli.parse_args(["--preset", "tiny", "--experiment_name", "exp", "--resume_from_checkpoint", "latest"])
    with pytest.raises(cli.RunError) as err:
        cli._resume_path(config, config.resolved_output_dir(2))
    assert "no checkpoint-N folder in outputs/exp_ws2" in str(err.value)
    assert "--output_dir outputs/exp_ws1" in str(err.value)
    assert cli._resume_path(config, config.resolved_output_dir(1)).endswith("checkpoint-3")


def test_resume_checks_the_stored_configuration(cli, tmp_path):
    out = tmp_path / "run"
    flags = ["--output_dir", str(out), "--grad_accum", "2", "--per_device_batch_size", "4"]
    first = _config(cli, tmp_path, *flags)
    _fake_run(out, cli, first)
    stored = json.loads((out / cli.CONFIG_FILE).read_text())
    assert stored["curve"]["global_batch"] == 8 and stored["config"]["grad_accum"] == 2
    ckpt = str(out / "checkpoint-2")
    cli.check_output_dir(first, str(out), 1, ckpt)  # the same run: fine
    # the same global batch over 2 processes, and settings that do not change the curve: fine
    same = _config(cli, tmp_path, "--output_dir", str(out), "--grad_accum", "1", "--per_device_batch_size", "4",
                   "--logging_steps", "7", "--save_total_limit", "5")
    cli.check_output_dir(same, str(out), 2, ckpt)
    other = _config(cli, tmp_path, *flags, "--learning_rate", "1e-3", "--seed", "3")
    with pytest.raises(cli.RunError) as err:
        cli.check_output_dir(other, str(out), 1, ckpt)
    msg = str(err.value)
    assert "learning_rate: 0.003 in the checkpoint's run, 0.001 now" in msg and "seed: 42" in msg
    assert "grad_accum" not in msg
    with pytest.raises(cli.RunError, match="global_batch: 8 in the checkpoint's run, 16 now"):
        cli.check_output_dir(first, str(out), 2, ckpt)
    with pytest.raises(cli.RunError, match="would delete"):
        cli.check_output_dir(dataclasses.replace(first, overwrite_output_dir=True), str(out), 1, ckpt)
    # resuming into another folder that holds another run would mix the two
    elsewhere = tmp_path / "elsewhere"
    _fake_run(elsewhere, cli, first)
    with pytest.raises(cli.RunError, match=f"continues the run of {out}.*holds another run"):
        cli.check_output_dir(first, str(elsewhere), 1, ckpt)
    cli.check_output_dir(first, str(tmp_path / "fresh"), 1, ckpt)  # into an empty folder: fine


def test_a_second_run_into_the_same_folder_stops_before_loading(cli, tmp_path, capsys):
    import logging

    out = tmp_path / "out"
    config = _config(cli, tmp_path, "--output_dir", str(out))
    _fake_run(out, cli, config)
    before = sorted(p.name for p in out.rglob("*"))
    lg = logging.getLogger("opensloth")
    saved = (lg.level, lg.propagate, list(lg.handlers), list(lg.filters))
    try:
        code = cli.main(["--preset", "tiny", "--no_patches", "--output_dir", str(out), "--cache_dir",
                         str(tmp_path / "cache")])
    finally:
        lg.setLevel(saved[0])
        lg.propagate = saved[1]
        lg.handlers[:] = saved[2]
        lg.filters[:] = saved[3]
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / "cache").exists()


def test_the_last_step_is_always_logged(cli):
    from types import SimpleNamespace

    callback = cli.final_step_log_callback()
    logged = []
    for step in range(1, 11):
        control = SimpleNamespace(should_log=False)
        callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10), control)
        logged.append(control.should_log)
    # the step before the last closes the interval, so the last log holds the last step's loss alone
    assert [s for s, on in zip(range(1, 11), logged, strict=True) if on] == [9, 10]


# ------------------------------------------------------------------------------------------------ issue 16: command


def test_development_dataset_names_are_not_library_names(cli, capsys, tmp_path, monkeypatch):
    """The repository's shared datasets are files for tests and benchmarks: the command says to pass the file."""
    monkeypatch.chdir(tmp_path)
    for name in ("alpaca", "gsm8k", "hh_rlhf", "arena_hard"):
        err = _error(cli, capsys, ["--dataset", name])
        assert f"argument --dataset: {name!r} is one of the OpenSloth repository's development datasets" in err
        assert "../shared/data/chat/alpaca_en_demo.jsonl" in err
    (tmp_path / "gsm8k").mkdir()  # a local folder of that name is data like any other
    cli.parse_args(["--dataset", "gsm8k"])


def test_precompute_says_the_same_about_development_names(tmp_path, capsys):
    from opensloth.cli import precompute

    with pytest.raises(SystemExit, match="--data 'hh_rlhf': 'hh_rlhf' is one of the OpenSloth repository's "
                                         "development datasets"):
        precompute.main(["--data", "hh_rlhf", "--tokenizer", "unused", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--data 'gone.jsonl': file not found"):
        precompute.main(["--data", "gone.jsonl", "--tokenizer", "unused", "--output_dir", str(tmp_path)])


def test_wrapper_is_the_library_under_the_seed_name(cli, wrapper, capsys, tmp_path):
    for name in ("parse_args", "RunError", "check_lora_targets", "load_records", "prepare_datasets", "SUMMARY_FILE",
                 "_add_peft", "make_training_args", "run"):
        assert getattr(wrapper, name) is getattr(cli, name), name
    assert wrapper.main(["--preset", "tiny", "--print_config"]) == 0
    assert capsys.readouterr().out.startswith("OpenSloth training configuration:")
    with pytest.raises(SystemExit) as exc:
        wrapper.main(["--grad_accum", "0"])
    assert exc.value.code == 2 and "train_configurable.py: error: argument --grad_accum" in capsys.readouterr().err
    if _no_cuda():  # a run that cannot start: one line naming the script, exit status 2
        assert wrapper.main(["--preset", "tiny", "--backend", "unsloth", "--output_dir", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("train_configurable.py: error: --backend unsloth")


def _console_script(tmp_path: Path) -> Path:
    """The `opensloth` executable pip makes from pyproject.toml's [project.scripts] entry (same template), in a
    folder to put first on PATH, so the test runs this checkout's entry point."""
    import re

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # the table, up to the next one
    entry = re.search(r'^opensloth\s*=\s*"([^"]+)"', scripts, re.M).group(1)
    module, func = entry.split(":")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "opensloth"
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                   f"if __name__ == '__main__':\n    sys.exit({func}())\n")
    exe.chmod(0o755)
    return bindir


def _cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PATH"] = str(_console_script(tmp_path)) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("launcher", [["opensloth"], [sys.executable, "-m", "opensloth"]])
def test_console_command_and_python_m(tmp_path, launcher):
    env = _cli_env(tmp_path)

    def run(*args):
        return subprocess.run([*launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)

    out = run("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "precompute", "inspect"))
    out = run("train", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: opensloth train") and "--preset" in out.stdout
    code = ("import runpy, sys; sys.argv = ['opensloth', 'train', '--preset', 'tiny', '--print_config']\n"
            "try:\n    runpy.run_module('opensloth', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
            "if m in sys.modules))")
    if launcher == ["opensloth"]:
        out = run("train", "--preset", "tiny", "--grad_accum", "3", "--print_config")
        assert out.returncode == 0 and "tiny_ws1" in out.stdout and "4 x 3 x 1 = 12" in out.stdout
    else:  # printing the configuration imports none of the training stack (Unsloth must come first)
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "LOADED []" in out.stdout and "OpenSloth training configuration:" in out.stdout
    out = run("train", "--grad_accum", "0")
    assert out.returncode == 2 and "opensloth train: error: argument --grad_accum" in out.stderr
    out = run("fly")
    assert out.returncode == 2 and "unknown command 'fly'; choose from train, precompute, inspect" in out.stderr
    out = run("precompute", "--help")
    assert out.returncode == 0 and "usage: opensloth precompute" in out.stdout and "--pack" in out.stdout


def test_importing_the_command_package_stays_light():
    code = ("import sys, opensloth, opensloth.cli, opensloth.cli.train, opensloth.cli.precompute, "
            "opensloth.cli.inspect; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', "
            "'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inspect_writes_the_pages_of_the_batches_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import logging

    from opensloth.cli import inspect

    monkeypatch.chdir(tmp_path)
    lg = logging.getLogger("opensloth")
    saved = (lg.level, lg.propagate, list(lg.handlers), list(lg.filters))
    try:
        code = inspect.main(["--preset", "tiny", "--train_samples", "24", "--test_samples", "0", "--packing",
                             "balanced", "--per_device_batch_size", "1", "--batches", "2", "--pages_dir", "pages",
                             "--cache_dir", str(tmp_path / "cache")])
    finally:
        lg.setLevel(saved[0])
        lg.propagate = saved[1]
        lg.handlers[:] = saved[2]
        lg.filters[:] = saved[3]
    assert code == 0
    pages = sorted(p.name for p in (tmp_path / "pages").iterdir())
    assert pages == ["tiny_ws1_rank0_batch_000.html", "tiny_ws1_rank0_batch_001.html"]
    html = (tmp_path / "pages" / pages[0]).read_text(encoding="utf-8")
    assert "balanced sampler" in html  # the micro-batches in the order --packing balanced trains them
    assert not (tmp_path / "outputs").exists()  # no output folder, no checkpoint, no training
    assert "training..." not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        inspect.main(["--preset", "tiny", "--batches", "0"])
    assert exc.value.code == 2 and "argument --batches: must be a positive number" in capsys.readouterr().err


def test_fewer_items_than_processes_is_an_error_and_repeats_are_said(cli):
    with pytest.raises(cli.RunError, match="3 training samples for 4 processes: every process needs at least one"):
        cli.check_items_per_process(3, 4, 2, "padding_free")
    with pytest.raises(cli.RunError, match="1 training rows for 2 processes"):
        cli.check_items_per_process(1, 2, 1, "balanced")
    assert cli.check_items_per_process(7, 1, 4, "padding_free") is None  # one process: a short last batch, no repeat
    assert cli.check_items_per_process(16, 2, 4, "padding_free") is None  # 2 full steps of 2 x 4
    assert cli.check_items_per_process(5, 2, 4, "balanced") is None  # the balanced sampler trains the leftovers
    note = cli.check_items_per_process(13, 2, 4, "padding_free")
    assert note.startswith("13 training samples do not fill the last step of 2 processes x 4: 3 of them are trained "
                           "twice per epoch")
