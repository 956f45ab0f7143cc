"""opensloth.attention_check: the behavioural check that a model keeps packed samples apart (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch

from opensloth.attention_check import check_packed_attention
from opensloth.collate import PackedDataCollator
from tests._models import tiny_llama, tiny_qwen3

COLLATORS = {
    "flat": lambda: PackedDataCollator(layout="flat"),
    "flat-unsloth-keys": lambda: PackedDataCollator(layout="flat", metadata=("packed_seq_lengths", "use_cache")),
    "rows": lambda: PackedDataCollator(layout="rows", capacity=128),
    "padded": lambda: PackedDataCollator(layout="padded", pad_to_multiple_of=64),
}


@pytest.mark.parametrize("arch", [tiny_qwen3, tiny_llama], ids=["qwen3", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", list(COLLATORS))
def test_transformers_models_keep_packed_samples_apart(arch, impl, layout):
    model = arch(vocab_size=512, attn_implementation=impl)
    check = check_packed_attention(model, COLLATORS[layout]())
    assert check.honoured and check.conclusive, check.describe()
    assert check.packed_error < 1e-5 < 0.1 < check.leak_error  # fp32: exact; a leak moves the logits a lot
    assert "keeps packed samples apart" in check.describe()


def test_boundaries_lost_on_the_way_are_caught():
    """A collator whose batches lose their positions and metadata before the model: B attends to A."""
    model = tiny_qwen3(vocab_size=512)
    inner = PackedDataCollator(layout="flat")

    def stripped(features):
        return {"input_ids": inner(features)["input_ids"], "use_cache": False}

    check = check_packed_attention(model, stripped)
    assert check.conclusive and not check.honoured
    assert check.packed_error == pytest.approx(check.leak_error)
    assert "attend to each other" in check.describe()


def test_a_model_that_ignores_its_context_is_inconclusive():
    model = tiny_qwen3(vocab_size=512)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # attention contributes nothing: no leak can show
    check = check_packed_attention(model, PackedDataCollator(layout="flat"))
    assert not check.conclusive and check.leak_error < 1e-3
    assert "could not be told apart" in check.describe()


def test_probe_leaves_train_mode_weights_and_random_state_alone():
    model = tiny_llama(vocab_size=512, attention_dropout=0.5).train()  # dropout: the forwards draw random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    check_packed_attention(model, PackedDataCollator(layout="flat"))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_model_without_logits_is_refused():
    class NoLogits(torch.nn.Module):
        config = type("C", (), {"vocab_size": 512})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            return {"loss": self.w.sum()}

    with pytest.raises(RuntimeError, match="no logits"):
        check_packed_attention(NoLogits(), PackedDataCollator(layout="flat"))


def test_lora_dropout_does_not_fool_the_check():
    """LoRA dropout would give the three forwards different noise; the probe switches dropout layers off (and back)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen3(vocab_size=512), LoraConfig(r=8, lora_dropout=0.9, target_modules=["q_proj",
                                                                                                      "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # trained adapters: dropout on their input now changes the logits
    model.train()
    check = check_packed_attention(model, PackedDataCollator(layout="flat"))
    assert check.honoured and check.packed_error < 1e-5, check.describe()
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))

