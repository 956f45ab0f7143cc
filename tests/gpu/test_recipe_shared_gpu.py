"""The README recipe under torchrun: two ranks sharing the one GPU follow the one-process loss curve, sampler balanced.

``examples/qwen_sft.py``, unchanged (Unsloth, ``ddp_patch()``, the window re-cut, a 4-bit model with LoRA r 8 on the
attention projections, TRL's SFTTrainer on ``messages`` records, batch 8 // WORLD_SIZE x grad_accum 4), runs through
tests/gpu/recipe_driver.py, which only turns off TensorBoard and checkpoints, sets the output folder and the DDP
backend, and writes each rank's ``log_history`` to JSON. The model is a tiny random Qwen3 (4 layers, hidden 256, the
real Qwen3 tokenizer, default initialisation) saved to a folder, the data the first 138 records of the shared gsm8k
shard (128 train: exactly 4 optimizer steps of 32; 10 eval), MAX_STEPS 4.

Runs: one process, then two single-process torchrun "nodes" on 127.0.0.1 (``--nnodes 2 --node_rank i
--nproc_per_node 1``: each rank is LOCAL_RANK 0, so both load the model on cuda:0; ``ddp_backend="gloo"``, since NCCL
refuses two ranks on one device). Both ranks must train on cuda:0 with the balanced sampler, keep equal adapters, and
log per-step losses and an epoch-end eval loss equal to the one-process run's within ATOL.

The one-process run is the recipe as a user runs it on one GPU: ``ddp_patch()`` installs the balanced sampler in a
single process too, so it trains the same samples per step as the two ranks (without it, the Trainer's random order
trains other samples: tests/integration/test_recipe_driver.py shows the curves part on the CPU; a random model's loss
over 32 other gsm8k samples moves by about 1e-2: per-batch standard deviation 0.019 for 8 samples, CPU, fp32, this
model shape).

Run it alone: ``python -m pytest tests/gpu/test_recipe_shared_gpu.py`` (skipped without CUDA or Unsloth).

Tolerance: every optimizer step trains the same samples in both runs (the sampler's plan is world-size invariant) from
the same 4-bit weights (quantised from the same bf16 folder) and the same seeded LoRA initialisation, so the runs
differ only in rounding: the samples are grouped into micro-batches of 8 against 4 (bf16 activations rounded in other
GEMM shapes, at most 2^-8 relative per rounding, zero-mean and averaged over the ~6,000 tokens of a step) and the LoRA
gradients are summed in another order (DDP's all-reduce against local accumulation), then compounded by AdamW over
the steps. The issue that asked for this test measured this recipe as one process against two ranks sharing an H100
(no balancer) equal within 1e-4 over 8 steps. Training other samples in a step moves the loss by about 1e-2 (above).
ATOL = 5e-3 (about 4e-4 relative at the random model's ln(151936) = 11.9) is 50x the bf16 difference measured in the
issue and about half the effect of training other samples.
"""

from __future__ import annotations

import math

import pytest

from tests.gpu import recipe_driver
from tests.integration.shared_launch import launch_env

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(2700)]

STEPS = 4
TRAIN_SAMPLES = 128  # 4 steps of the recipe's global batch of 32 (8 x grad_accum 4): one epoch, no sample twice
ATOL = 5e-3


def _build_model(tokenizer, path) -> None:
    """A tiny random Qwen3 with the real Qwen3 tokenizer, saved in bf16 (the recipe quantises it to 4 bits)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipe_shared_gpu")


@pytest.fixture(scope="module")
def env(workdir, shared_data, qwen3_tokenizer):
    model_dir = workdir / "tiny_qwen3"
    _build_model(qwen3_tokenizer, model_dir)
    data = shared_data / "chat" / "gsm8k_train-00000-of-00002.jsonl"
    assert data.is_file(), data
    return launch_env(MODEL_NAME=str(model_dir), DATASET=str(data), MAX_SEQ_LENGTH="1024", MAX_STEPS=str(STEPS),
                      TRAIN_SAMPLES=str(TRAIN_SAMPLES), HF_DATASETS_CACHE=str(workdir / "hf_datasets"))


def _run(workdir, env, name: str, world_size: int, **extra: str) -> tuple[list[dict], str]:
    return recipe_driver.launch(workdir, env, name, world_size, timeout=900, **extra)


@pytest.fixture(scope="module")
def single(workdir, env):
    # first, alone: it prepares the dataset cache and Unsloth's compiled cache (in the cwd) that the ranks reuse
    (report,), _ = _run(workdir, env, "ws1", 1)
    assert report["world_size"] == 1 and report["global_step"] == STEPS
    assert report["sampler"] == "BalancedBatchSampler"
    assert report["args"]["per_device_train_batch_size"] == 8 and report["args"]["gradient_accumulation_steps"] == 4
    return report


@pytest.fixture(scope="module")
def two_ranks(workdir, env, single):
    reports, logs = _run(workdir, env, "ws2", 2, RECIPE_DDP_BACKEND="gloo")
    return reports, logs


def _eval_loss(report: dict) -> float:
    values = [h["eval_loss"] for h in report["log_history"] if "eval_loss" in h]
    assert len(values) == 1, report["log_history"]
    return float(values[0])


def test_both_ranks_train_on_the_one_gpu(two_ranks):
    reports, logs = two_ranks
    for rank, report in enumerate(reports):  # each as local rank 0 of its own node, on cuda:0
        assert f"rank {rank} of 2 (local rank 0 of 1) on cuda:0" in logs
        assert report["rank"] == rank and report["world_size"] == 2 and report["local_rank"] == 0
        assert report["device"] == "cuda:0", report["device"]
        assert report["global_step"] == STEPS
        assert report["sampler"] == "BalancedBatchSampler"
        assert report["args"]["ddp_backend"] == "gloo"
        assert report["args"]["per_device_train_batch_size"] == 4 and report["args"]["gradient_accumulation_steps"] == 4
        assert report["lora_b_sq_norm"] is not None and report["lora_b_sq_norm"] > 0  # the adapters moved from zero
    a, b = (r["trainable_sq_norm"] for r in reports)
    assert abs(a - b) <= 1e-6 * abs(a), (a, b)  # DDP kept the two replicas equal


def test_two_ranks_sharing_the_gpu_follow_the_one_process_curve(single, two_ranks):
    reports, _ = two_ranks
    reference = recipe_driver.step_losses(single, STEPS)
    losses = recipe_driver.step_losses(reports[0], STEPS)
    # both ranks log the loss averaged over the ranks
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(recipe_driver.step_losses(reports[1], STEPS), losses))
    assert all(math.isfinite(x) for x in reference + losses)
    diffs = [abs(a - b) for a, b in zip(reference, losses)]
    print("\nper-step losses, one process:", reference)
    print("per-step losses, two ranks:  ", losses)
    print("differences:", diffs)
    assert max(diffs) <= ATOL, list(zip(range(1, STEPS + 1), reference, losses))
    # the epoch-end eval loss (token-weighted over the 10 eval records) agrees too
    e1, e2 = _eval_loss(single), _eval_loss(reports[0])
    print("eval loss, one process / two ranks:", e1, e2)
    assert math.isfinite(e2) and abs(e1 - e2) <= ATOL, (e1, e2)
