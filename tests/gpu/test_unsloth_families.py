"""Packed == unpacked with Unsloth on the GPU, for every text family Unsloth trains, through `wire_batches`.

Models: one small randomly initialised model per family (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text;
4 layers, hidden 256, 4 query / 2 KV heads of 64, the real Qwen3 tokenizer and vocabulary), saved and loaded with
``FastLanguageModel.from_pretrained`` in 16 bits with LoRA r 8 on every linear layer of the blocks and Unsloth's
gradient checkpointing. ``initializer_range=0.05``: with the default 0.02 every token's loss is close to ln(vocab)
whatever it attends to, and with 0.2 the random Llama, Qwen2 and Mistral models are chaotic in bf16 (two equivalent
attention kernels, SDPA and eager, already give LoRA gradients 39% apart for Llama; measured on CPU, 2026-12-07),
so no gradient check could pass on them. At 0.05 (CPU, bf16, transformers 5.17, these eight samples) SDPA vs eager
moves the loss by at most 3.6e-5 and the gradients by 0.7% to 1.05% relative L2 for every family, while letting the
documents attend to each other moves the gradients by 107% to 130% (the loss by 1.3e-4 to 5.4e-3).

Oracle: each sample alone (one sample per micro-batch, eval mode, no packing metadata), right-padded with ignored
labels to one width: a causal model's logits at a sample's tokens do not depend on what follows them, and one width
means one compile of Unsloth's kernels where eight lengths meant eight (Gemma 2's softcapping attention autotunes
each new shape, which kept its tests from finishing in 200 s on the H100, 2026-12-07). Under test: the samples in
one packed row, collated by the collator `opensloth.wiring.wire_batches` chose for the family (Unsloth's flat
packed protocol; where the family's attention does not keep packed samples apart, rows with a dense block-causal
mask or else padded rows), in train mode. The padded fallback is checked against the same oracle for every family.
The packed loss must equal the token-weighted mean of the per-sample losses and the LoRA gradients their
token-weighted sum.

Tolerances (bf16): the same bf16 weights on both sides, so the differences are bf16 activations rounded in kernels
of other shapes (varlen FlashAttention over the row against attention over one sample, other matmul shapes). Loss
within 5e-4 relative (14x the kernel noise above) and gradients within 5% relative L2 (5x the noise, 20x below
what a leak does). The negative control (the same row with positions running on and no boundary metadata: what
packing looks like when attention ignores it) must miss the gradient tolerance by 3x, which shows that the test
can fail; its loss is printed but not asserted, because for Gemma a leak moves the loss by less than 5e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

LOSS_RTOL = 5e-4
GRAD_RTOL = 5e-2
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
            "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"query_pre_attn_scalar": 64, "sliding_window": 4096}),
            "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"query_pre_attn_scalar": 64,
                                                                  "sliding_window": 4096})}


def _build(family: str, tokenizer, path) -> None:
    import transformers

    config_cls, model_cls, extra = _CLASSES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, qwen3_tokenizer):
    from unsloth import FastLanguageModel

    from opensloth.wiring import wire_batches

    path = tmp_path_factory.mktemp(f"{request.param}_random")
    _build(request.param, qwen3_tokenizer, path)
    # 4096: the negative control's row of the eight samples (about 2,100 tokens) carries no packing metadata, and
    # Unsloth cuts such an input at max_seq_length without cutting its labels
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=4096, load_in_4bit=False,
                                                         dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0.0, random_state=0, use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    wiring = wire_batches(model, backend="unsloth", packing="packed", max_seq_length=2048,
                          pad_token_id=tokenizer.pad_token_id)
    print(f"\n{request.param}: layout {wiring.layout}, varlen {wiring.varlen}, check "
          f"{wiring.check.describe() if wiring.check else None}")
    yield request.param, model, tokenizer, wiring
    del model
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def samples(chat_records, qwen3_tokenizer):
    """Eight real chat samples (alpaca, gsm8k, hh_rlhf, arena_hard) with assistant-only labels, 40..600 tokens."""
    from opensloth.data.chat import tokenize_chat_dataset

    out = []
    for name, k in (("alpaca", 2), ("gsm8k", 2), ("hh_rlhf", 2), ("arena_hard", 2)):
        ds = tokenize_chat_dataset(chat_records[name][:16], qwen3_tokenizer, max_seq_length=600)
        fits = [r for r in ds if len(r["input_ids"]) >= 40][:k]
        assert len(fits) == k
        out += [(np.asarray(r["input_ids"]), np.asarray(r["labels"])) for r in fits]
    return out


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _forward_backward(model, batch, train: bool) -> tuple[float, torch.Tensor]:
    device = next(model.parameters()).device
    model.train(train)
    for p in _trainable(model):
        p.grad = None
    loss = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss
    loss.backward()
    grads = torch.cat([p.grad.detach().float().reshape(-1) for p in _trainable(model)])
    for p in _trainable(model):
        p.grad = None
    return float(loss), grads


def _reference(model, samples, pad_token_id: int):
    """Token-weighted mean loss and gradient of the samples run alone (eval mode, plain causal batches, each
    right-padded to the longest sample's width with ignored labels)."""
    n = [int((torch.as_tensor(lab)[1:] != -100).sum()) for _, lab in samples]
    total = sum(n)
    width = max(len(ids) for ids, _ in samples)
    loss_sum, grad_sum = 0.0, None
    for (ids, lab), n_i in zip(samples, n):
        ids_row = torch.full((1, width), pad_token_id, dtype=torch.long)
        lab_row = torch.full((1, width), -100, dtype=torch.long)
        ids_row[0, : len(ids)], lab_row[0, : len(lab)] = torch.as_tensor(ids), torch.as_tensor(lab)
        batch = {"input_ids": ids_row, "labels": lab_row, "use_cache": False}
        loss, grads = _forward_backward(model, batch, train=False)
        loss_sum += loss * n_i
        grad_sum = grads * (n_i / total) if grad_sum is None else grad_sum + grads * (n_i / total)
    return loss_sum / total, grad_sum, total


def _hf_packed_attention_stats() -> dict:
    """Unsloth's counters of packed attention calls on the transformers modeling path (switched on by wire_batches)."""
    try:
        from unsloth.utils.hf_packed_attention import HF_PACKED_ATTENTION_STATS
    except ImportError:
        return {}
    return dict(HF_PACKED_ATTENTION_STATS)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_packed_row_equals_samples_alone(family_model, samples):
    family, model, tokenizer, wiring = family_model
    assert wiring.check is not None and wiring.check.conclusive, wiring.check
    assert wiring.layout in ("flat", "masked_rows", "padded")
    assert (wiring.layout != "padded") == wiring.check.honoured  # padded exactly when every packed route leaked
    ref_loss, ref_grads, n_targets = _reference(model, samples, tokenizer.pad_token_id)
    assert n_targets > 500 and ref_grads.norm() > 0
    row = {"input_ids": np.concatenate([s[0] for s in samples]), "labels": np.concatenate([s[1] for s in samples]),
           "seq_lengths": np.array([len(s[0]) for s in samples])}
    batch = wiring.collator([row])
    stats = _hf_packed_attention_stats()
    loss, grads = _forward_backward(model, batch, train=True)
    calls = {k: v - stats.get(k, 0) for k, v in _hf_packed_attention_stats().items()}
    print(f"\n{family} ({wiring.layout}): packed loss {loss:.6f} vs alone {ref_loss:.6f} (rel "
          f"{abs(loss - ref_loss) / ref_loss:.2e}); grad rel err {_rel(grads, ref_grads):.2e}; {n_targets} targets; "
          f"Unsloth's varlen on the transformers path (calls in this step): {calls or 'not there'}")
    assert math.isfinite(loss)
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss)
    assert _rel(grads, ref_grads) <= GRAD_RTOL

    # Negative control: one flat row, boundary labels masked as packed, positions running on, no packed_seq_lengths.
    from opensloth.collate import collate_samples

    flat = collate_samples([row], layout="flat", metadata=("use_cache",))
    flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
    wrong_loss, wrong_grads = _forward_backward(model, flat, train=True)
    print(f"{family} control: loss {wrong_loss:.6f} (rel {abs(wrong_loss - ref_loss) / ref_loss:.2e}); grad rel err "
          f"{_rel(wrong_grads, ref_grads):.2e}")
    assert _rel(wrong_grads, ref_grads) > 3 * GRAD_RTOL


def test_padded_fallback_equals_samples_alone(family_model, samples):
    """The padded rows every family falls back to (its own check, or another rank's, failed): one sample per row."""
    from opensloth.collate import PackedDataCollator

    family, model, tokenizer, _ = family_model
    ref_loss, ref_grads, _ = _reference(model, samples, tokenizer.pad_token_id)
    rows = [{"input_ids": np.concatenate([s[0] for s in half]), "labels": np.concatenate([s[1] for s in half]),
             "seq_lengths": np.array([len(s[0]) for s in half])} for half in (samples[:4], samples[4:])]
    batch = PackedDataCollator(pad_token_id=tokenizer.pad_token_id, layout="padded")(rows)
    assert batch["input_ids"].shape[0] == len(samples)
    loss, grads = _forward_backward(model, batch, train=True)
    print(f"\n{family} (padded fallback): loss {loss:.6f} vs alone {ref_loss:.6f} (rel "
          f"{abs(loss - ref_loss) / ref_loss:.2e}); grad rel err {_rel(grads, ref_grads):.2e}")
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss)
    assert _rel(grads, ref_grads) <= GRAD_RTOL


def test_sft_trainer_trains_packed_rows(family_model, chat_records, qwen3_tokenizer, tmp_path):
    """SFTTrainer with wire_batches' collator over packed rows: trains, the loss is finite, the adapters move."""
    from trl import SFTConfig, SFTTrainer

    from opensloth.data.chat import tokenize_chat_dataset
    from opensloth.data.packed import build_packed_dataset

    family, model, tokenizer, wiring = family_model
    records = chat_records["alpaca"][:24] + chat_records["gsm8k"][:24] + chat_records["arena_hard"][:8]
    rows = build_packed_dataset(tokenize_chat_dataset(records, qwen3_tokenizer, max_seq_length=1024), 1024)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", max_length=1024,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, bf16=True, fp16=False,
        logging_nan_inf_filter=False, seed=0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    start = [p.detach().clone() for p in lora_b]
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         data_collator=wiring.collator)
    wiring.attach(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\n{family} ({wiring.layout}): losses {losses}")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(p, s) for p, s in zip(lora_b, start))
