"""The `tiny` preset: a small randomly initialised Qwen3-architecture model, the project's own tokenizer and the
synthetic chat dataset, sized to train on a CPU in well under two minutes with no network.

Everything is built in-process from code: `build_tiny_tokenizer` (opensloth.presets.tokenizer), `build_tiny_model`
(below) and `synthetic_chat_records` (opensloth.presets.synthetic).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TINY", "TinyPreset", "build_tiny_model", "save_tiny_model_folder", "tiny_datasets"]


@dataclass(frozen=True)
class TinyPreset:
    """Model shape, data sizes and training defaults of the tiny preset (the script's flags override the defaults).

    The model is a Qwen3 decoder (RMSNorm, SwiGLU MLP, rotary positions, q/k norms, grouped-query attention) with
    tied embeddings: about 0.4M parameters at these sizes.
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # Training defaults used when the matching flag is not given on the command line.
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "max_seq_length": 1024,
        "train_samples": 384,
        "test_samples": 32,
        "num_epochs": 1,
        "learning_rate": 3e-3,
        "per_device_batch_size": 4,
        "grad_accum": 2,
        "lora_r": 0,
        "warmup_ratio": 0.05,
        "logging_steps": 5,
        "save_strategy": "epoch",
        "eval_strategy": "epoch",
        "packing": "padding_free",
        # transformers + peft: on a GPU, Unsloth spends a minute compiling for a model this small (--backend auto
        # or unsloth to exercise it anyway)
        "backend": "hf",
    })

    def model_config(self, attn_implementation: str = "sdpa"):
        """The `transformers.Qwen3Config` of the tiny model."""
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=None,
        )
        config.rope_theta = self.rope_theta
        config._attn_implementation = attn_implementation
        return config

    def as_dict(self) -> dict:
        return asdict(self)


TINY = TinyPreset()


def build_tiny_model(preset: TinyPreset = TINY, *, seed: int = 0, attn_implementation: str = "sdpa",
                     tokenizer=None):
    """A randomly initialised `Qwen3ForCausalLM` of the preset's shape, in float32.

    The initial weights depend only on `seed` (every rank builds the same model). When `tokenizer` is given, the
    vocabulary size is checked against it so that no token id falls outside the embedding table.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    if tokenizer is not None and len(tokenizer) > preset.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the tiny model's vocab_size is {preset.vocab_size}; "
            f"build both from the same preset (build_tiny_tokenizer(preset.vocab_size))"
        )
    config = preset.model_config(attn_implementation)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.float()


def tiny_datasets(train_samples: int, test_samples: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and evaluation record lists from the synthetic stream for `seed`."""
    from opensloth.presets.synthetic import synthetic_chat_records

    train = synthetic_chat_records(train_samples, seed=seed)
    test = synthetic_chat_records(test_samples, seed=seed, start=train_samples)
    return train, test


def save_tiny_model_folder(path: str | os.PathLike, preset: TinyPreset = TINY, *, seed: int = 0) -> Path:
    """Write the tiny model and tokenizer to `path` (a folder `from_pretrained` loads: Unsloth's path on GPU).

    Idempotent: an existing folder written for the same preset and seed is reused. The folder is written under a
    temporary name and renamed into place, so concurrent callers never see a half-written folder.
    """
    import shutil
    import uuid

    from opensloth.presets.tokenizer import build_tiny_tokenizer, tokenizer_fingerprint

    path = Path(path)
    tokenizer = build_tiny_tokenizer(preset.vocab_size, preset.max_position_embeddings)
    stamp = {"preset": preset.as_dict(), "seed": seed, "tokenizer": tokenizer_fingerprint(tokenizer)}
    marker = path / "opensloth_preset.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(stamp, default=str)):
                return path
        except (OSError, ValueError):
            pass
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        build_tiny_model(preset, seed=seed, tokenizer=tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "opensloth_preset.json").write_text(json.dumps(stamp, default=str, indent=1))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():  # another process may have won the race with the same contents
            raise
    return path
