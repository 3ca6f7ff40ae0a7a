"""The reference model: a Llama-architecture causal LM (RoPE, GQA, SwiGLU, RMSNorm) from presets.

Llama is what Memory3 used, and every part of memory3 (encoder, injection through
``AttentionInterface``, generation) targets plain ``transformers`` models that need no custom code
to save, load or ``generate()``. :data:`PRESETS` go from ``tiny`` (2 CPU cores) to ``large`` (one
GPU). ``max_position_embeddings`` covers the memory interval ``[0, reference_length)`` *and* the
context after it. :func:`save_reference_model` writes the model (safetensors), the tokenizer and
``memory_spec.json`` into one directory; :func:`load_reference_model` reads all three back.

Measurements: docs/experiments.md
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from memory3.core.memory_spec import SPEC_FILENAME, MemorySpec
from memory3.sdk.model.positions import memory_spec_for

from .tokenizer import load_tokenizer, save_tokenizer


@dataclass(frozen=True)
class ModelPreset:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    max_positions: int = 1024
    tie_embeddings: bool = True  # the embedding table dominates tiny models; tying halves it


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(n_layers=4, hidden=128, n_heads=4, n_kv_heads=2, ffn=384),
    "small": ModelPreset(n_layers=6, hidden=256, n_heads=8, n_kv_heads=4, ffn=768),
    "base": ModelPreset(n_layers=12, hidden=512, n_heads=8, n_kv_heads=4, ffn=1536, max_positions=2048),
    "large": ModelPreset(n_layers=16, hidden=768, n_heads=12, n_kv_heads=4, ffn=2048, max_positions=2048),
}


def model_config(preset: str | ModelPreset, vocab_size: int, bos_token_id: int = 1,
                 eos_token_id: int = 2, pad_token_id: int = 0) -> LlamaConfig:
    """A ``LlamaConfig`` for a preset name (or an explicit :class:`ModelPreset`)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if p.hidden % p.n_heads or p.n_heads % p.n_kv_heads:
        raise ValueError(f"hidden {p.hidden} / heads {p.n_heads} / kv heads {p.n_kv_heads} do not divide")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.ffn,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads,
        head_dim=p.hidden // p.n_heads,
        max_position_embeddings=p.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        initializer_range=0.02,
    )


def build_model(preset: str | ModelPreset, vocab_size: int, seed: int | None = None, **token_ids) -> LlamaForCausalLM:
    """A freshly initialised model; ``seed`` makes the initial weights reproducible."""
    config = model_config(preset, vocab_size, **token_ids)
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def default_memory_spec(model: LlamaForCausalLM, memory_layers: tuple[int, ...] | None = None,
                        tokens_per_head: int = 8, reference_length: int = 128,
                        codec: str = "int8") -> MemorySpec:
    """The memory spec for a model: by default its first half of layers (the paper's choice)."""
    return memory_spec_for(model, memory_layers, tokens_per_head, reference_length, codec)


def save_reference_model(model: LlamaForCausalLM, tokenizer, spec: MemorySpec, directory: str | Path) -> Path:
    """Write model (safetensors), tokenizer and memory spec into one directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    spec.save(directory)
    return directory


def load_reference_model(directory: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """Load ``(model, tokenizer, spec)`` saved by :func:`save_reference_model`; model in eval mode."""
    directory = Path(directory)
    missing = [name for name in ("config.json", SPEC_FILENAME) if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"model directory {str(directory)!r} has no {' or '.join(missing)}: give a directory "
                         "written by `memory3 train` (RUN_DIR/model) or by save_reference_model")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model, load_tokenizer(directory), MemorySpec.load(directory)
