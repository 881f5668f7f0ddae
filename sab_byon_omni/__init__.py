"""sab-byon-omni: train and sample causal transformer language models."""

from sab_byon_omni.errors import SabError

__version__ = "2.1.0"
__all__ = ["SabError", "__version__"]
