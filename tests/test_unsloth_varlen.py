"""opensloth.patching.unsloth_varlen against a stand-in of Unsloth's attention dispatch module (Unsloth itself
refuses to import without a GPU; tests/gpu covers the real one)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from opensloth.patching import unsloth_varlen

DISPATCH = "unsloth.utils.attention_dispatch"


class FakeLean:
    calls: list = []

    @staticmethod
    def apply(*args):
        FakeLean.calls.append(args)
        return "out"


def fake_dispatch(**overrides):
    module = types.ModuleType(DISPATCH)
    module._TORCH_VARLEN_ATTN = None
    module._LeanFlashVarlen = FakeLean
    module._LEAN_VARLEN = False
    module._varlen_can_use_cudnn = lambda *a, **k: True
    for name, value in overrides.items():
        if value is _DELETE:
            delattr(module, name)
        else:
            setattr(module, name, value)
    return module


_DELETE = object()


@pytest.fixture
def install(monkeypatch):
    def put(module):
        monkeypatch.setitem(sys.modules, DISPATCH, module)
        monkeypatch.setattr(unsloth_varlen, "_flash_available", lambda: True)
        return module

    return put


def test_switch_sets_unsloths_varlen_names_once(install):
    dispatch = install(fake_dispatch())
    assert unsloth_varlen.unsloth_varlen_state() == "fallback"
    assert unsloth_varlen.switch_on_unsloth_varlen() == "switched"
    assert dispatch._LEAN_VARLEN is True and dispatch._varlen_can_use_cudnn() is False
    assert unsloth_varlen.unsloth_varlen_state() == "switched"
    fn = dispatch._TORCH_VARLEN_ATTN
    assert unsloth_varlen.switch_on_unsloth_varlen() == "already" and dispatch._TORCH_VARLEN_ATTN is fn
    # varlen_attn's signature, mapped onto Unsloth's lean autograd function: causal window (-1, 0) -> is_causal
    FakeLean.calls.clear()
    assert fn("q", "k", "v", "cu", "cu", 7, 7, scale=0.5, window_size=(-1, 0), enable_gqa=True) == "out"
    assert FakeLean.calls == [("q", "k", "v", "cu", 7, True, 0.5, -1, 0)]
    fn("q", "k", "v", "cu", "cu", 7, 7, window_size=(63, 0))  # sliding window: not the plain causal flag
    assert FakeLean.calls[-1] == ("q", "k", "v", "cu", 7, False, None, 63, 0)


def test_native_varlen_needs_no_switch(install):
    native = lambda *a, **k: None  # noqa: E731 - torch's own varlen_attn, loaded by Unsloth on torch >= 2.12
    dispatch = install(fake_dispatch(_TORCH_VARLEN_ATTN=native))
    assert unsloth_varlen.switch_on_unsloth_varlen() == "not needed"
    assert dispatch._TORCH_VARLEN_ATTN is native and dispatch._LEAN_VARLEN is False
    assert unsloth_varlen.unsloth_varlen_state() == "native"


def test_switch_on_a_dispatch_that_never_loaded_a_varlen_kernel(install):
    """Unsloth 2026.10.9 on torch 2.11 defines no _varlen_can_use_cudnn at all (only when it loaded varlen_attn):
    the switch must not require it (seen on the H100, where it wrongly reported itself unavailable)."""
    dispatch = install(fake_dispatch(_varlen_can_use_cudnn=_DELETE))
    assert unsloth_varlen.switch_on_unsloth_varlen() == "switched"
    assert dispatch._varlen_can_use_cudnn() is False and dispatch._LEAN_VARLEN is True


@pytest.mark.parametrize("missing", ["_LeanFlashVarlen", "_LEAN_VARLEN", "_TORCH_VARLEN_ATTN"])
def test_another_unsloth_keeps_its_own_path_with_a_warning(install, caplog, missing):
    dispatch = install(fake_dispatch(**{missing: _DELETE}))
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert unsloth_varlen.switch_on_unsloth_varlen() == "unavailable"
    assert getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is None  # nothing changed
    assert missing in caplog.text and "slower" in caplog.text


def test_no_flash_kernel_changes_nothing(install, monkeypatch, caplog):
    dispatch = install(fake_dispatch())
    monkeypatch.setattr(unsloth_varlen, "_flash_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert unsloth_varlen.switch_on_unsloth_varlen() == "unavailable"
    assert dispatch._TORCH_VARLEN_ATTN is None and "FlashAttention" in caplog.text


def test_without_unsloth_it_says_so(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, DISPATCH, None)  # import fails
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert unsloth_varlen.switch_on_unsloth_varlen() == "unavailable"
    assert unsloth_varlen.unsloth_varlen_state() == "no unsloth"


def test_ddp_patch_switches_it_on_for_unsloth_on_a_gpu(install, monkeypatch):
    """ddp_patch() right after `import unsloth` (the README's recipe) switches Unsloth's varlen branch on for a GPU
    device, and leaves it alone on a CPU or without Unsloth."""
    import types

    import torch

    from opensloth.patching import ddp_patch as dp
    from tests.test_ddp_patch import fresh  # noqa: F401  (the fixture restores the Trainer afterwards)

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for device, with_unsloth, want in (("cpu", True, None), ("cuda", False, None), ("cuda", True, "switched")):
        dispatch = install(fake_dispatch())
        monkeypatch.setattr(dp, "_state", None)
        monkeypatch.setattr(dp, "_pin_device", lambda env, d=device: (torch.device(d, 0), "test"))
        if with_unsloth:
            monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
        else:
            monkeypatch.delitem(sys.modules, "unsloth", raising=False)
        dp.ddp_patch(balance_ranks=False, step_figures=False, token_weighted_eval=False)
        assert unsloth_varlen.unsloth_varlen_state() == (want or "fallback"), (device, with_unsloth)
        assert (dispatch._TORCH_VARLEN_ATTN is not None) == (want is not None)


def test_the_former_name_and_import_path_still_switch_it_on(install):
    """../shared/gpu/README.md and older scripts call opensloth.patching.unsloth_attention.patch_unsloth_torch_varlen:
    that path now reaches the same switch and reports "patched" where it switched."""
    from opensloth.patching.unsloth_attention import patch_unsloth_torch_varlen

    dispatch = install(fake_dispatch())
    assert patch_unsloth_torch_varlen() == "patched" and dispatch._LEAN_VARLEN is True
    assert patch_unsloth_torch_varlen() == "already"
