"""CPU tests of the Unsloth varlen attention patch against fake Unsloth modules, and of the collator keys it reads.

The fake modules stand in for unsloth.models.qwen3 / llama, unsloth.utils.packing and attention_dispatch: module
globals with Unsloth's names and call shapes (2026.10.9), so routing, idempotence, the version gate and the loud
failures are tested without a GPU. The kernel itself (aten's FlashAttention-2) is CUDA-only: its layout code is
tested against a dense block-causal oracle with the aten op replaced by a per-segment reference; the real kernel is
tested in tests/gpu.
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensloth.collate import UNSLOTH_VARLEN_METADATA, PackedDataCollator, collate_samples
from opensloth.patching import unsloth_attention as ua

ORIG_INFO = ("orig", "info")
ORIG_ATTN = "orig-attention"


@dataclass
class FakeContext:
    """The fields of unsloth.utils.attention_dispatch.AttentionContext that the wrapper reads."""

    bsz: int
    q_len: int
    kv_seq_len: int
    seq_info: Any
    attention_mask: Any = None
    sliding_window: Any = None
    prefix_seg_info: Any = None
    is_causal: bool = True


@dataclass
class FakeConfig:
    n_kv_heads: int = 2
    flash_varlen_kwargs: Any = None


class FakeUnsloth:
    """Fake Unsloth modules registered in sys.modules; records what the originals were called with."""

    def __init__(self, monkeypatch, version: str = "2026.10.9", drop: tuple[str, ...] = ()):
        self.calls: list[tuple] = []
        calls = self.calls

        def get_packed_info_from_kwargs(kwargs, device, position_ids=None):
            calls.append(("packed_info", tuple(sorted(kwargs)), position_ids is not None))
            return ORIG_INFO

        def run_attention(*, config, context, Q, K, V):
            calls.append(("run_attention", context.seq_info))
            return ORIG_ATTN

        def mark_allow_overlength(module):
            calls.append(("mark_allow_overlength", type(module).__name__))
            module._unsloth_allow_packed_overlength = True

        class LeanFlashVarlen:
            @staticmethod
            def apply(*args):
                calls.append(("lean_apply", args))
                return "lean-out"

        root = types.ModuleType("unsloth")
        root.__version__ = version
        qwen3 = types.ModuleType("unsloth.models.qwen3")
        qwen3.get_packed_info_from_kwargs = get_packed_info_from_kwargs
        qwen3.run_attention = run_attention
        llama = types.ModuleType("unsloth.models.llama")
        llama.get_packed_info_from_kwargs = get_packed_info_from_kwargs
        packing = types.ModuleType("unsloth.utils.packing")
        packing.mark_allow_overlength = mark_allow_overlength
        dispatch = types.ModuleType("unsloth.utils.attention_dispatch")
        dispatch._TORCH_VARLEN_ATTN = None
        dispatch._LeanFlashVarlen = LeanFlashVarlen
        dispatch._LEAN_VARLEN = False
        dispatch._torch_varlen_takes = lambda *a, **k: True
        dispatch._varlen_can_use_cudnn = lambda *a, **k: True
        self.modules = {"unsloth": root, "unsloth.models.qwen3": qwen3, "unsloth.models.llama": llama,
                        "unsloth.utils.packing": packing, "unsloth.utils.attention_dispatch": dispatch}
        for name, attr in (n.rsplit(".", 1) for n in drop):
            delattr(self.modules[name], attr)
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        self.originals = {"get_packed_info_from_kwargs": get_packed_info_from_kwargs, "run_attention": run_attention}
        ua._reset_counts()

    @property
    def qwen3(self):
        return self.modules["unsloth.models.qwen3"]

    @property
    def llama(self):
        return self.modules["unsloth.models.llama"]

    @property
    def dispatch(self):
        return self.modules["unsloth.utils.attention_dispatch"]


@pytest.fixture
def fake(monkeypatch):
    return FakeUnsloth(monkeypatch)


def _varlen_kwargs(lengths=(3, 5), max_seqlen=8):
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32)
    return {"opensloth_cu_seqlens": cu, "opensloth_max_seqlen": max_seqlen, "position_ids": torch.zeros(1, 8)}


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------


def test_packed_info_routes_only_batches_with_the_key(fake):
    assert ua.patch_unsloth_varlen_attention() == "patched"
    kwargs = _varlen_kwargs()
    info = fake.qwen3.get_packed_info_from_kwargs(kwargs, torch.device("cpu"))
    assert isinstance(info, ua.VarlenInfo)
    assert info.cu_seqlens is kwargs["opensloth_cu_seqlens"] and info.max_seqlen == 8
    assert fake.calls == []
    # Without the key: the original, with the same arguments.
    plain = {"packed_seq_lengths": torch.tensor([3, 5])}
    assert fake.qwen3.get_packed_info_from_kwargs(plain, "cpu") == ORIG_INFO
    assert fake.calls == [("packed_info", ("packed_seq_lengths",), False)]


def test_missing_max_seqlen_is_an_error(fake):
    ua.patch_unsloth_varlen_attention()
    kwargs = _varlen_kwargs()
    del kwargs["opensloth_max_seqlen"]
    with pytest.raises(ValueError, match="opensloth_max_seqlen"):
        fake.qwen3.get_packed_info_from_kwargs(kwargs, "cpu")


def test_model_level_lookup_returns_none_with_the_key(fake):
    ua.patch_unsloth_varlen_attention()
    kwargs = _varlen_kwargs()
    pos = torch.zeros(1, 8, dtype=torch.long)
    # LlamaModel_fast_forward's call (position_ids given): no lengths inferred, no packed_seq_lengths inserted.
    assert fake.llama.get_packed_info_from_kwargs(kwargs, "cpu", pos) is None
    # Llama's own attention (no position_ids) is not routed: loud.
    with pytest.raises(ua.UnslothPatchError, match="Qwen3"):
        fake.llama.get_packed_info_from_kwargs(kwargs, "cpu")
    assert fake.llama.get_packed_info_from_kwargs({}, "cpu", pos) == ORIG_INFO
    assert fake.calls == [("packed_info", (), True)]


def test_run_attention_routes_varlen_info_to_the_kernel(fake, monkeypatch):
    seen = []

    def kernel(Q, K, V, cu, max_seqlen, *, scale=None):
        seen.append((Q, K, V, cu, max_seqlen, scale))
        return "varlen-out"

    monkeypatch.setattr(ua, "flash_varlen_attention", kernel)
    ua.patch_unsloth_varlen_attention()
    Q, K, V = torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16), \
        torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16)
    info = ua.VarlenInfo(torch.tensor([0, 3, 8, 16], dtype=torch.int32), 8)
    config = FakeConfig(flash_varlen_kwargs={"softmax_scale": 0.25})
    out = fake.qwen3.run_attention(config=config, context=FakeContext(2, 8, 8, info), Q=Q, K=K, V=V)
    assert out == "varlen-out"
    assert len(seen) == 1 and seen[0][0] is Q and seen[0][1] is K and seen[0][3] is info.cu_seqlens
    assert seen[0][4] == 8 and seen[0][5] == 0.25
    assert ua.varlen_status()["eager_calls"] == 1
    # Unsloth's own metadata (a plain tuple) and None go to the original.
    assert fake.qwen3.run_attention(config=config, context=FakeContext(2, 8, 8, ORIG_INFO), Q=Q, K=K, V=V) == ORIG_ATTN
    assert fake.qwen3.run_attention(config=config, context=FakeContext(2, 8, 8, None), Q=Q, K=K, V=V) == ORIG_ATTN
    assert [c[1] for c in fake.calls] == [ORIG_INFO, None]
    assert len(seen) == 1


@pytest.mark.parametrize("bad, match", [
    (dict(attention_mask=torch.ones(1)), "attention_mask"),
    (dict(kv_seq_len=12), "KV cache"),
    (dict(sliding_window=4), "sliding-window"),
    (dict(is_causal=False), "causal"),
])
def test_run_attention_refuses_what_varlen_cannot_do(fake, bad, match):
    ua.patch_unsloth_varlen_attention()
    Q = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16)
    K = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    fields = dict(bsz=1, q_len=8, kv_seq_len=8, seq_info=ua.VarlenInfo(torch.tensor([0, 8]), 8)) | bad
    with pytest.raises(ValueError, match=match):
        fake.qwen3.run_attention(config=FakeConfig(), context=FakeContext(**fields), Q=Q, K=K, V=K)


def test_run_attention_refuses_fp32(fake):
    ua.patch_unsloth_varlen_attention()
    Q = torch.zeros(1, 4, 8, 16)
    info = ua.VarlenInfo(torch.tensor([0, 8]), 8)
    with pytest.raises(ValueError, match="fp16/bf16"):
        fake.qwen3.run_attention(config=FakeConfig(), context=FakeContext(1, 8, 8, info), Q=Q, K=Q[:, :2], V=Q[:, :2])


# ---------------------------------------------------------------------------------------------------------------
# The kernel wrapper's layout, against a dense block-causal oracle
# ---------------------------------------------------------------------------------------------------------------


def _reference_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale=None):
    """Stand-in for aten._flash_attention_forward on (total, H, D) tensors: per-segment causal attention in fp32."""
    assert causal and dropout == 0.0 and torch.equal(cu_q, cu_k) and max_q == max_k
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert hi - lo <= max_q
        qs = q[lo:hi].transpose(0, 1).float()
        ks = k[lo:hi].transpose(0, 1).float().repeat_interleave(groups, 0)
        vs = v[lo:hi].transpose(0, 1).float().repeat_interleave(groups, 0)
        out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out, None, None, None, None


def test_flash_varlen_attention_layout_matches_block_causal_attention(monkeypatch):
    from opensloth.masks import block_causal_mask

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", _reference_flash, raising=False)
    gen = torch.Generator().manual_seed(0)
    rows = [[5, 3, 6], [9, 2]]  # capacity 16: row 0 pads 2, row 1 pads 5
    width, heads, kv_heads, dim = 16, 4, 2, 8
    batch = collate_samples([{"input_ids": list(range(sum(r))), "seq_lengths": r} for r in rows], layout="rows",
                            capacity=width, metadata=UNSLOTH_VARLEN_METADATA)
    Q = torch.randn(2, heads, width, dim, generator=gen)
    K = torch.randn(2, kv_heads, width, dim, generator=gen)
    V = torch.randn(2, kv_heads, width, dim, generator=gen)
    out = ua.flash_varlen_attention(Q, K, V, batch["opensloth_cu_seqlens"], batch["opensloth_max_seqlen"], scale=0.3)
    assert out.shape == (2, width, heads, dim)
    mask = block_causal_mask(rows, width)  # (P, 1, L, L) bool, True = attend; padding segments included
    expected = F.scaled_dot_product_attention(Q, K.repeat_interleave(2, 1), V.repeat_interleave(2, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The oracle can tell: plain causal attention over each row differs from it.
    causal = F.scaled_dot_product_attention(Q, K.repeat_interleave(2, 1), V.repeat_interleave(2, 1),
                                            is_causal=True, scale=0.3).transpose(1, 2)
    assert not torch.allclose(causal, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Idempotence, version gate, missing targets
# ---------------------------------------------------------------------------------------------------------------


def test_patch_is_idempotent_and_wraps_what_is_installed(fake):
    assert ua.patch_unsloth_varlen_attention() == "patched"
    first = (fake.qwen3.get_packed_info_from_kwargs, fake.qwen3.run_attention, fake.llama.get_packed_info_from_kwargs)
    assert ua.patch_unsloth_varlen_attention() == "already"
    second = (fake.qwen3.get_packed_info_from_kwargs, fake.qwen3.run_attention, fake.llama.get_packed_info_from_kwargs)
    assert first == second
    assert fake.qwen3.run_attention._opensloth_original is fake.originals["run_attention"]
    assert fake.qwen3.get_packed_info_from_kwargs._opensloth_original is fake.originals["get_packed_info_from_kwargs"]
    status = ua.varlen_status()
    assert status["unsloth.models.qwen3.run_attention"] and status["unsloth.models.llama.get_packed_info_from_kwargs"]


def test_patch_wraps_a_replacement_installed_later(fake):
    ua.patch_unsloth_varlen_attention()

    def replacement(*, config, context, Q, K, V):
        return "replacement"

    fake.qwen3.run_attention = replacement  # e.g. another patch installed after ours
    assert ua.patch_unsloth_varlen_attention() == "patched"
    assert fake.qwen3.run_attention._opensloth_original is replacement


def test_version_gate(monkeypatch, caplog):
    fake = FakeUnsloth(monkeypatch, version="2026.11.1")
    with pytest.raises(ua.UnslothPatchError, match=r"2026\.11\.1.*2026\.10\.9"):
        ua.patch_unsloth_varlen_attention()
    assert not getattr(fake.qwen3.run_attention, "_opensloth_varlen_wrapper", False)
    monkeypatch.setattr(logging.getLogger("opensloth"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        assert ua.patch_unsloth_varlen_attention(allow_untested=True) == "patched"
    assert "2026.11.1" in caplog.text


@pytest.mark.parametrize("drop", ["unsloth.models.qwen3.run_attention",
                                  "unsloth.models.qwen3.get_packed_info_from_kwargs",
                                  "unsloth.models.llama.get_packed_info_from_kwargs"])
def test_missing_target_is_loud(monkeypatch, drop):
    FakeUnsloth(monkeypatch, drop=(drop,))
    with pytest.raises(ua.UnslothPatchError, match=drop.rsplit(".", 1)[1]):
        ua.patch_unsloth_varlen_attention()


def test_unsloth_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)  # import raises ImportError
    with pytest.raises(ua.UnslothPatchError, match="import unsloth"):
        ua.patch_unsloth_varlen_attention()


# ---------------------------------------------------------------------------------------------------------------
# The model hooks and the loud "never ran" check
# ---------------------------------------------------------------------------------------------------------------


class RoutedModel(torch.nn.Module):
    """Calls Unsloth's qwen3 globals the way Qwen3Attention_fast_forward does (looked up at call time)."""

    def __init__(self, qwen3, route=True):
        super().__init__()
        self.qwen3, self.route = qwen3, route
        self.config = types.SimpleNamespace(num_attention_heads=4, head_dim=16)
        self.seen: list[dict] = []

    def forward(self, input_ids=None, **kwargs):
        self.seen.append(kwargs)
        if not self.route:
            return input_ids
        info = self.qwen3.get_packed_info_from_kwargs(kwargs, input_ids.device)
        Q = torch.zeros(1, 4, input_ids.shape[1], 16, dtype=torch.bfloat16)
        K = torch.zeros(1, 2, input_ids.shape[1], 16, dtype=torch.bfloat16)
        ctx = FakeContext(1, input_ids.shape[1], input_ids.shape[1], info)
        return self.qwen3.run_attention(config=FakeConfig(), context=ctx, Q=Q, K=K, V=K)


def test_enable_checks_the_first_forward_and_passes_when_routed(fake, monkeypatch):
    monkeypatch.setattr(ua, "flash_varlen_attention", lambda Q, K, V, cu, m, *, scale=None: "varlen-out")
    model = ua.enable_unsloth_varlen(RoutedModel(fake.qwen3))
    assert ("mark_allow_overlength", "RoutedModel") in fake.calls
    ids = torch.zeros(1, 8, dtype=torch.long)
    cu64 = torch.tensor([0, 3, 8])  # int64: the pre-hook converts to int32
    assert model(input_ids=ids, opensloth_cu_seqlens=cu64, opensloth_max_seqlen=8) == "varlen-out"
    passed = model.seen[-1]["opensloth_cu_seqlens"]
    assert passed.dtype == torch.int32 and passed.tolist() == [0, 3, 8]
    assert ua.varlen_status()["checked_forwards"] == 1
    # Batches without the key are not checked and reach the original.
    assert model(input_ids=ids) == ORIG_ATTN
    assert ua.varlen_status()["checked_forwards"] == 1
    # Idempotent: one set of hooks.
    ua.enable_unsloth_varlen(model)
    model(input_ids=ids, opensloth_cu_seqlens=cu64, opensloth_max_seqlen=8)
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_forward_that_never_reaches_the_wrapper_raises(fake):
    model = ua.enable_unsloth_varlen(RoutedModel(fake.qwen3, route=False))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ua.UnslothPatchError, match="attended to each other"):
        model(input_ids=ids, opensloth_cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
              opensloth_max_seqlen=8)


def test_unpatched_module_after_enable_raises(fake):
    """Someone re-installs Unsloth's original after enabling: the key would be ignored, so the check fires."""
    model = ua.enable_unsloth_varlen(RoutedModel(fake.qwen3))
    fake.qwen3.get_packed_info_from_kwargs = fake.originals["get_packed_info_from_kwargs"]
    fake.qwen3.run_attention = fake.originals["run_attention"]
    with pytest.raises(ua.UnslothPatchError):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long),
              opensloth_cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), opensloth_max_seqlen=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(opensloth_max_seqlen=None), "positive int"),
    (dict(opensloth_max_seqlen=0), "positive int"),
    (dict(packed_seq_lengths=torch.tensor([3, 5])), "both"),
    (dict(opensloth_cu_seqlens=torch.tensor([[0, 8]])), "1-D"),
])
def test_pre_hook_validates_the_batch(fake, kwargs, match):
    model = ua.enable_unsloth_varlen(RoutedModel(fake.qwen3))
    batch = dict(input_ids=torch.zeros(1, 8, dtype=torch.long),
                 opensloth_cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32), opensloth_max_seqlen=8) | kwargs
    with pytest.raises(ValueError, match=match):
        model(**batch)


def test_pre_hook_refuses_batches_over_the_int32_limit(fake):
    model = RoutedModel(fake.qwen3)
    model.config = types.SimpleNamespace(num_attention_heads=32, head_dim=128)
    ua.enable_unsloth_varlen(model)
    ids = torch.zeros(1, 1, dtype=torch.long).expand(1, 600_000)  # (600k + 128 * S) * 32 * 128 >= 2^31
    with pytest.raises(ValueError, match="int32"):
        model(input_ids=ids, opensloth_cu_seqlens=torch.tensor([0, 600_000], dtype=torch.int32),
              opensloth_max_seqlen=600_000)


def test_compiled_attention_is_counted_once_per_trace_without_recompiles(fake, monkeypatch):
    """Under torch.compile the wrapper is traced into the graph: the count is taken at trace time (no guard on it),
    and the pre-hook's dynamic mark keeps a new segment count from recompiling."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(ua, "flash_varlen_attention",
                        lambda Q, K, V, cu, m, *, scale=None: Q.transpose(1, 2) + cu.sum() * 0 + m)
    ua.patch_unsloth_varlen_attention()
    qwen3 = fake.qwen3

    def attention(hidden, kwargs):  # the compiled region: Qwen3Attention_fast_forward's calls
        info = qwen3.get_packed_info_from_kwargs(kwargs, hidden.device)
        Q = hidden.view(1, 8, 4, 16).transpose(1, 2)
        K = Q[:, :2]
        ctx = FakeContext(1, 8, 8, info)
        return qwen3.run_attention(config=FakeConfig(), context=ctx, Q=Q, K=K, V=K)

    counter = CompileCounter()
    compiled = torch.compile(attention, backend=counter)
    torch._dynamo.reset()
    hidden = torch.ones(1, 8, 64, dtype=torch.bfloat16)
    for lengths in ([8], [3, 5], [1, 2, 5], [2, 2, 2, 2]):
        cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32)
        torch._dynamo.maybe_mark_dynamic(cu, 0)
        out = compiled(hidden, {"opensloth_cu_seqlens": cu, "opensloth_max_seqlen": 8})
        assert out.shape == (1, 8, 4, 16) and float(out[0, 0, 0, 0]) == 9.0
    assert counter.frame_count == 1
    status = ua.varlen_status()
    assert status["traced"] == 1 and status["eager_calls"] == 0
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# The collator's varlen keys
# ---------------------------------------------------------------------------------------------------------------


def test_collator_varlen_keys_rows():
    rows = [[5, 3, 6], [9, 2], [16]]
    features = [{"input_ids": list(range(100, 100 + sum(r))), "seq_lengths": r} for r in rows]
    batch = PackedDataCollator(layout="rows", capacity=16, metadata=UNSLOTH_VARLEN_METADATA)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids", "opensloth_cu_seqlens", "opensloth_max_seqlen",
                          "use_cache"}
    # Row r's segments start at r * 16; each row's padding tail is a segment of its own; no empty segments.
    expected = [0, 5, 8, 14, 16, 25, 27, 32, 48]
    cu = batch["opensloth_cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.device.type == "cpu" and cu.tolist() == expected
    assert batch["opensloth_max_seqlen"] == 16 and batch["use_cache"] is False
    # The offsets agree with position_ids: a segment starts exactly where the flattened positions restart.
    starts = (batch["position_ids"].reshape(-1) == 0).nonzero().flatten().tolist()
    assert starts == expected[:-1]


def test_collator_varlen_keys_flat_with_a_constant_bound():
    features = [{"input_ids": list(range(n))} for n in (7, 3, 12)]
    batch = collate_samples(features, layout="flat", metadata=UNSLOTH_VARLEN_METADATA, max_seqlen=4096)
    assert batch["opensloth_cu_seqlens"].tolist() == [0, 7, 10, 22]
    assert batch["opensloth_max_seqlen"] == 4096
    # Default bound for the flat layout: the longest segment.
    assert collate_samples(features, metadata=UNSLOTH_VARLEN_METADATA)["opensloth_max_seqlen"] == 12
    # Together with cu_seq_lens: equal values, separate tensors.
    both = collate_samples(features, metadata=("cu_seq_lens", "opensloth_varlen"))
    assert both["opensloth_cu_seqlens"].tolist() == both["cu_seq_lens_q"].tolist()
    assert both["opensloth_cu_seqlens"].data_ptr() != both["cu_seq_lens_q"].data_ptr()


def test_collator_varlen_bound_errors():
    features = [{"input_ids": list(range(n))} for n in (7, 3, 12)]
    with pytest.raises(ValueError, match="12 tokens is longer than max_seqlen = 10"):
        collate_samples(features, metadata=UNSLOTH_VARLEN_METADATA, max_seqlen=10)
    with pytest.raises(ValueError, match="add 'opensloth_varlen'"):
        collate_samples(features, max_seqlen=16)
    with pytest.raises(ValueError, match="max_seqlen"):
        PackedDataCollator(metadata=UNSLOTH_VARLEN_METADATA, max_seqlen=0)
