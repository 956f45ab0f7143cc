"""opensloth.patching.unsloth_packing and its use by wire_batches / BatchWiring.attach: what Unsloth's own
packing=True switches on besides its collator, called through stand-in Unsloth modules (Unsloth does not import
without a GPU)."""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from opensloth.patching import unsloth_packing
from opensloth.wiring import BatchWiring, wire_batches
from tests._models import tiny_qwen3


class Recorder(torch.nn.Module):
    """tiny Qwen3 that notes each forward in a shared event list."""

    def __init__(self, events: list):
        super().__init__()
        self.inner, self.events = tiny_qwen3(), events
        self.config = self.inner.config

    def forward(self, **kwargs):
        self.events.append("forward")
        return self.inner(**kwargs)


@pytest.fixture
def fake_unsloth(monkeypatch):
    """A stand-in `unsloth` package with the two functions, recording their calls in order."""
    events: list = []
    calls = SimpleNamespace(events=events, scoped=[])
    packed = types.ModuleType("unsloth.utils.hf_packed_attention")
    packed.enable_hf_packed_attention = lambda: events.append("enable") or True
    flash = types.ModuleType("unsloth.utils.flash_impl")
    flash.scope_flash_attention_impl_to_train = lambda trainer, model, key: calls.scoped.append((trainer, model, key))
    for name, module in {"unsloth": types.ModuleType("unsloth"), "unsloth.utils": types.ModuleType("unsloth.utils"),
                         packed.__name__: packed, flash.__name__: flash}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(unsloth_packing, "_warned", set())
    return calls


def wire(model, backend="unsloth", packing="packed"):
    return wire_batches(model, backend=backend, packing=packing, max_seq_length=64, pad_token_id=0,
                        per_device_batch_size=2)


def test_unsloth_wiring_switches_packed_attention_on_before_the_check(fake_unsloth):
    wiring = wire(Recorder(fake_unsloth.events))
    assert wiring.layout == "flat" and wiring.check.honoured
    assert fake_unsloth.events[0] == "enable" and fake_unsloth.events.count("enable") == 1
    assert fake_unsloth.events.count("forward") >= 3  # the check's forwards, all after the switch


def test_attach_scopes_unsloths_flash_kernels_to_training_on_the_flat_protocol(fake_unsloth):
    wiring = wire(tiny_qwen3())
    trainer = SimpleNamespace(model=object())
    wiring.attach(trainer)
    assert fake_unsloth.scoped == [(trainer, trainer.model, "seq_lengths")]


@pytest.mark.parametrize("wiring", [
    BatchWiring(collator=dict, layout="rows"),  # transformers backend (varlen None)
    BatchWiring(collator=dict, layout="masked_rows", varlen="switched"),
    BatchWiring(collator=dict, layout="padded", varlen="switched"),
])
def test_attach_leaves_other_backends_and_layouts_alone(fake_unsloth, wiring):
    wiring.attach(SimpleNamespace(model=None))
    assert fake_unsloth.scoped == []


def test_the_transformers_backend_switches_nothing(fake_unsloth):
    wire(tiny_qwen3(), backend="hf")
    assert "enable" not in fake_unsloth.events


def test_an_unsloth_without_the_functions_warns_once_and_trains_on(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    monkeypatch.setattr(unsloth_packing, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert unsloth_packing.enable_unsloth_packed_attention() is False
        assert unsloth_packing.enable_unsloth_packed_attention() is False
        assert unsloth_packing.scope_unsloth_flash_impl(SimpleNamespace(), None) is False
    warnings = [r.getMessage() for r in caplog.records if "this Unsloth has no" in r.getMessage()]
    assert len(warnings) == 2  # one per missing function, not per call
    assert "enable_hf_packed_attention" in warnings[0] and "scope_flash_attention_impl_to_train" in warnings[1]


def test_without_unsloth_nothing_is_called_or_said(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert unsloth_packing.enable_unsloth_packed_attention() is False
        assert unsloth_packing.scope_unsloth_flash_impl(SimpleNamespace(), None) is False
    assert not [r for r in caplog.records if "this Unsloth has no" in r.getMessage()]
