"""Packed == unpacked with Unsloth QLoRA on the GPU, through OpenSloth's FlashAttention-2 varlen route.

Model: a randomly initialised Qwen3-architecture model (4 layers, hidden 256, 4 query / 2 KV heads of 64, tied
embeddings, the real Qwen3 tokenizer and vocabulary), saved and loaded with
``FastLanguageModel.from_pretrained(load_in_4bit=True)`` and LoRA r 8 on q/k/v/o with Unsloth's gradient
checkpointing, as users train it. ``initializer_range=0.2`` makes the random model's predictions depend on the
context (with the default 0.02 every token's loss is ~ln(vocab) whatever it attends to, and a test of attention
could not fail).

Oracle: each sample alone through Unsloth's stock path (eval mode: eager blocks, causal SDPA, no packing metadata).
Under test: the samples packed into fixed-capacity rows (and into one flat row), collated with the
``opensloth_varlen`` metadata, in train mode (Unsloth's compiled blocks with the aten FlashAttention-2 varlen call
traced in). The packed loss must equal the token-weighted mean of the per-sample losses, and the LoRA gradients
the token-weighted sum of the per-sample gradients.

Tolerances (bf16): both sides quantise the same NF4 weights, so the differences come only from bf16 activations
rounded in different kernels (FlashAttention varlen in compiled blocks vs SDPA in the stock forward, different
matmul shapes): each rounding is at most 2^-8 relative, zero-mean, and averages out over ~2,200 trained tokens.
Measured on the H100 (2026-11-24): packed vs alone differed by 8.1e-4 in loss (4.7e-5 relative, at loss 17.19) and
by 1.4e-2 relative L2 in the LoRA gradients, for both layouts; letting the documents attend to each other (the
negative control: the same rows without the varlen keys, which is what Unsloth does with packed rows when the patch
is missing) moved the loss by 6.6e-2 and the gradients by 0.63. So: loss within 5e-4 relative (~8.6e-3, 10x the
measured bf16 difference, 7x below the control's effect), gradients within 5% (3.5x the measured difference, 12x
below the control's); the control must miss both by at least 3x the tolerance, which shows the test can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

LOSS_RTOL = 5e-4
QWEN3 = "unsloth.models.qwen3"
GRAD_RTOL = 5e-2
CAPACITY = 1024


def _config(tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="module")
def unsloth_model(tmp_path_factory, qwen3_tokenizer):
    from unsloth import FastLanguageModel

    from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
    from opensloth.patching.unsloth_attention import enable_unsloth_varlen

    device = ddp_patch()  # the seed flow: before the model is loaded
    patch_optimize_sft_trainer_batch_samples()
    from transformers import Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("qwen3_random")
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen3ForCausalLM(_config(qwen3_tokenizer)).to(torch.bfloat16)
    base.save_pretrained(path)
    qwen3_tokenizer.save_pretrained(path)
    del base
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=2048, load_in_4bit=True,
                                                         device_map=f"cuda:{device.index}")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=0)
    enable_unsloth_varlen(model)
    return model, tokenizer


@pytest.fixture(scope="module")
def samples(chat_records, qwen3_tokenizer):
    """Ten real chat samples (alpaca, gsm8k, hh_rlhf, arena_hard) with assistant-only labels, 40..900 tokens."""
    from opensloth.data.chat import tokenize_chat_dataset

    out = []
    for name, k in (("alpaca", 3), ("gsm8k", 3), ("hh_rlhf", 2), ("arena_hard", 2)):
        ds = tokenize_chat_dataset(chat_records[name][:12], qwen3_tokenizer, max_seq_length=900)
        fits = [r for r in ds if len(r["input_ids"]) >= 40][:k]
        assert len(fits) == k, f"{name}: fewer than {k} of its first 12 records have 40..900 tokens"
        out += [(np.asarray(r["input_ids"]), np.asarray(r["labels"])) for r in fits]
    return out


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _grads(model):
    return torch.cat([p.grad.detach().float().reshape(-1) for p in _trainable(model)])


def _zero(model):
    for p in _trainable(model):
        p.grad = None


def _on(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _reference(model, samples, device):
    """Token-weighted mean loss and gradient of the samples run alone (Unsloth's stock path, eval mode)."""
    n = [int((torch.as_tensor(lab)[1:] != -100).sum()) for _, lab in samples]
    total = sum(n)
    model.eval()
    _zero(model)
    loss_sum = 0.0
    for (ids, lab), n_i in zip(samples, n):
        batch = {"input_ids": torch.as_tensor(ids)[None], "labels": torch.as_tensor(lab)[None], "use_cache": False}
        loss = model(**_on(batch, device)).loss
        (loss * (n_i / total)).backward()
        loss_sum += float(loss) * n_i
    grads = _grads(model)
    _zero(model)
    return loss_sum / total, grads, total


def _run(model, batch, device, train=True):
    model.train(train)
    _zero(model)
    loss = model(**_on(batch, device)).loss
    loss.backward()
    grads = _grads(model)
    _zero(model)
    return float(loss), grads


def _features(samples):
    return [{"input_ids": ids, "labels": lab} for ids, lab in samples]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packed_loss_and_grads_equal_samples_alone(unsloth_model, samples, layout):
    from opensloth.collate import UNSLOTH_VARLEN_METADATA, collate_samples
    from opensloth.patching.unsloth_attention import varlen_status

    model, tokenizer = unsloth_model
    device = next(model.parameters()).device
    ref_loss, ref_grads, n_targets = _reference(model, samples, device)
    assert n_targets > 500 and ref_grads.norm() > 0

    options = dict(layout="rows", capacity=CAPACITY, pack=True) if layout == "rows" else dict(layout="flat")
    batch = collate_samples(_features(samples), pad_token_id=tokenizer.pad_token_id,
                            metadata=UNSLOTH_VARLEN_METADATA, max_seqlen=CAPACITY, **options)
    if layout == "rows":
        assert batch["input_ids"].shape[0] >= 2  # several rows: documents share rows, padding tails exist
    before = varlen_status()
    loss, grads = _run(model, batch, device)
    after = varlen_status()
    assert after["traced"] + after["eager_calls"] > before["traced"] + before["eager_calls"] or after["traced"] > 0
    assert after[f"{QWEN3}.run_attention"] and after[f"{QWEN3}.get_packed_info_from_kwargs"]  # routed through ours
    print(f"\n{layout}: packed loss {loss:.6f} vs samples alone {ref_loss:.6f} (diff {loss - ref_loss:+.2e}); "
          f"grad rel err {_rel(grads, ref_grads):.2e}; {n_targets} targets; status {after}")
    assert math.isfinite(loss)
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss)
    assert _rel(grads, ref_grads) <= GRAD_RTOL

    if layout == "rows":
        # Negative control: the same rows without the varlen keys (Unsloth runs plain causal attention over each
        # row, documents see each other): the comparison must fail clearly.
        plain = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "use_cache")}
        wrong_loss, wrong_grads = _run(model, plain, device, train=False)
        print(f"control (documents attend to each other): loss {wrong_loss:.6f} (diff {wrong_loss - ref_loss:+.2e}); "
              f"grad rel err {_rel(wrong_grads, ref_grads):.2e}")
        assert abs(wrong_loss - ref_loss) > 3 * LOSS_RTOL * abs(ref_loss)
        assert _rel(wrong_grads, ref_grads) > 3 * GRAD_RTOL


def test_compiled_blocks_kept(unsloth_model, samples):
    """The varlen batch ran in Unsloth's compiled blocks (not demoted to the stock forward); self-contained: it runs
    one packed forward and backward itself, so it does not depend on the tests before it."""
    from opensloth.collate import UNSLOTH_VARLEN_METADATA, collate_samples
    from opensloth.patching.unsloth_attention import varlen_status

    model, tokenizer = unsloth_model
    batch = collate_samples(_features(samples[:4]), layout="flat", pad_token_id=tokenizer.pad_token_id,
                            metadata=UNSLOTH_VARLEN_METADATA, max_seqlen=CAPACITY)
    loss, _ = _run(model, batch, next(model.parameters()).device)
    assert math.isfinite(loss)
    layers = [m for m in model.modules() if type(m).__name__ == "Qwen3DecoderLayer"]
    assert layers
    modes = {m.__dict__.get("_unsloth_block_mode") for m in layers}
    print(f"\nblock modes {modes}, status {varlen_status()}")
    assert 0 not in modes  # _OFF: "block compile failed ...; keeping the stock forward"
    assert varlen_status()["traced"] > 0


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_sft_trainer_flow(unsloth_model, chat_records, qwen3_tokenizer, tmp_path, layout):
    """ddp_patch() + patch_optimize_sft_trainer_batch_samples() (in the model fixture, before loading) and
    SFTTrainer with OpenSloth's packed rows and collator: trains, the loss is finite, the adapters move."""
    from trl import SFTConfig, SFTTrainer

    from opensloth.collate import UNSLOTH_VARLEN_METADATA, PackedDataCollator
    from opensloth.data.chat import tokenize_chat_dataset
    from opensloth.data.packed import build_packed_dataset
    from opensloth.patching.unsloth_attention import varlen_status

    model, tokenizer = unsloth_model
    records = chat_records["alpaca"][:24] + chat_records["gsm8k"][:24] + chat_records["arena_hard"][:8]
    rows = build_packed_dataset(tokenize_chat_dataset(records, qwen3_tokenizer, max_seq_length=CAPACITY), CAPACITY)
    assert len(rows) >= 8
    options = dict(capacity=CAPACITY) if layout == "rows" else dict(max_seqlen=CAPACITY)
    collator = PackedDataCollator(pad_token_id=tokenizer.pad_token_id, layout=layout,
                                  metadata=UNSLOTH_VARLEN_METADATA, **options)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", max_length=CAPACITY,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, bf16=True, fp16=False,
        logging_nan_inf_filter=False, seed=0,
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    start = [p.detach().clone() for p in lora_b]
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         data_collator=collator)
    before = varlen_status()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\n{layout}: losses {losses}; status {varlen_status()}")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(p, s) for p, s in zip(lora_b, start))
    after = varlen_status()
    assert after["traced"] + after["eager_calls"] >= before["traced"] + before["eager_calls"]
    # the Trainer and Unsloth's own patches left our wrappers in place, and the wrapper has run
    assert after[f"{QWEN3}.run_attention"] and after[f"{QWEN3}.get_packed_info_from_kwargs"]
    assert after["traced"] + after["eager_calls"] > 0
    from opensloth.patching.state import trainer_state

    assert trainer_state(trainer).window_stats is not None  # the batch-samples wrapper ran
