"""Glue between memory3 and a Hugging Face causal LM: identity, positions, attention, sampling."""

from .attention import attention_hook, attention_modules
from .fingerprint import model_fingerprint
from .rope import Rotary, memory_key_shift, reference_position_ids
from .sampling import SamplingConfig, decode, left_pad, nucleus_distribution, position_ids_from_mask, sample_nucleus

__all__ = [
    "Rotary", "SamplingConfig", "attention_hook", "attention_modules", "decode", "left_pad", "memory_key_shift",
    "model_fingerprint", "nucleus_distribution", "position_ids_from_mask", "reference_position_ids", "sample_nucleus",
]
