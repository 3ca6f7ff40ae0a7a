"""Glue between memory3 and a Hugging Face causal LM: identity, positions, attention, sampling."""

from .attention import attention_hook, attention_modules
from .fingerprint import model_fingerprint
from .positions import (LayerRotation, ModelGeometry, UnsupportedModelError, memory_key_shift, memory_spec_for,
                        probe_geometry, reference_position_ids)
from .precision import float32_compute
from .sampling import SamplingConfig, decode, left_pad, nucleus_distribution, position_ids_from_mask, sample_nucleus

__all__ = [
    "LayerRotation", "ModelGeometry", "SamplingConfig", "UnsupportedModelError", "attention_hook", "attention_modules",
    "decode", "float32_compute", "left_pad", "memory_key_shift", "memory_spec_for", "model_fingerprint", "nucleus_distribution", "position_ids_from_mask", "probe_geometry", "reference_position_ids", "sample_nucleus",
]
