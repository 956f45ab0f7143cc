"""train_scripts/train_configurable.py: --seed fixes the LoRA initialisation whatever ran before it, and
--ddp_backend reaches the training arguments."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def cli():
    import opensloth.cli.train as module

    return module


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _lora_weights(cli, seed: int, rng_draws: int) -> dict[str, torch.Tensor]:
    from tests._models import tiny_qwen3

    config, _ = cli.parse_args(["--preset", "tiny", "--lora_r", "4", "--seed", str(seed)])
    model = tiny_qwen3(seed=0)
    torch.rand(rng_draws)  # whatever consumed torch's RNG before the adapters were added (data, other libraries)
    model = cli._add_peft(config, model, ["q_proj", "v_proj"])
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}


def test_seed_fixes_the_lora_initialisation(cli):
    a = _lora_weights(cli, seed=3, rng_draws=1)
    b = _lora_weights(cli, seed=3, rng_draws=17)
    c = _lora_weights(cli, seed=4, rng_draws=1)
    assert a and set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_ddp_backend_flag(cli, monkeypatch):
    import trl

    seen = []
    monkeypatch.setattr(trl, "SFTConfig", lambda **kwargs: seen.append(kwargs) or kwargs)
    config, _ = cli.parse_args(["--preset", "tiny"])
    assert config.ddp_backend == "auto"
    cli.make_training_args(config, 2, "hf")
    assert "ddp_backend" not in seen[-1]  # auto: accelerate's choice (nccl on CUDA, gloo on CPU)
    config, _ = cli.parse_args(["--preset", "tiny", "--ddp_backend", "gloo"])
    cli.make_training_args(config, 2, "hf")
    assert seen[-1]["ddp_backend"] == "gloo"
    cli.make_training_args(config, 1, "hf")
    assert "ddp_backend" not in seen[-1]  # one process: no process group
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "tiny", "--ddp_backend", "mpi"])
    if not torch.cuda.is_available():
        config, _ = cli.parse_args(["--preset", "tiny", "--ddp_backend", "nccl"])
        with pytest.raises(cli.RunError, match="--ddp_backend nccl needs CUDA"):
            cli.check_machine(config, "hf")  # the machine checks, before the training arguments are built
