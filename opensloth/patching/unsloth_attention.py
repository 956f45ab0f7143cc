"""Former home of the removed Qwen3-only attention route; only its varlen switch remains, under its old import
path (../shared/gpu/README.md and older scripts import ``patch_unsloth_torch_varlen`` from here).

The switch itself lives in `opensloth.patching.unsloth_varlen`; import it from there.
"""

from opensloth.patching.unsloth_varlen import patch_unsloth_torch_varlen

__all__ = ["patch_unsloth_torch_varlen"]
