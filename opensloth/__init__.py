"""OpenSloth: multi-GPU Unsloth/TRL supervised fine-tuning with native sequence packing.

Importing this package changes nothing and imports no unsloth, trl or datasets: patches apply only when called,
and subpackages are imported on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
