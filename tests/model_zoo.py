"""Tiny random-weight causal LMs from many transformers families, built from configs (no downloads).

The conformance tests run the same checks over every family here, so that code which hooks into a
model's attention (position ids, rope, KV cache, attention registry) is exercised against the layouts
real checkpoints use: half-split and interleaved rope, partial rotary, NoPE layers, sliding/global
layer mixes with different rope bases, MoE blocks, MLA, and families that must be refused (absolute
position embeddings, attention that bypasses the registry). Every model is small (hidden 64, head dim
16, vocab 256) so a forward takes milliseconds on CPU; sliding windows and attention chunks are 512 so
they never bite on short test inputs. ``NOTES`` says in one line what each family is here to cover.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB_SIZE = 256
WINDOW = 512  # sliding window / attention chunk: larger than any test input

# Shape shared by all families; a key is only passed where the family's config knows that field
# (or maps it through ``attribute_map``, e.g. gpt2's n_embd), so non-llama configs take what fits.
COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}


def _rope(theta: float = 10000.0, **extra) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **extra}


# family -> config kwargs on top of COMMON (always passed, so a typo here fails loudly).
FAMILY_KWARGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "mixtral": {**_MOE, "sliding_window": WINDOW},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "gemma": {},
    "gemma2": {"num_hidden_layers": 4, "sliding_window": WINDOW, "query_pre_attn_scalar": 16},
    "gemma3": {
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "rope_parameters": {"sliding_attention": _rope(10_000.0), "full_attention": _rope(1_000_000.0)},
    },
    "phi": {"rope_parameters": _rope(partial_rotary_factor=0.5)},
    "phi3": {},
    "phimoe": {**_MOE},
    "gpt_neox": {"rope_parameters": _rope(partial_rotary_factor=0.25)},
    "olmo": {},
    "olmo2": {},
    "olmo3": {
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granite": {
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.125,
        "residual_multiplier": 0.25,
        "logits_scaling": 4.0,
    },
    "granitemoe": {**_MOE, "attention_multiplier": 0.125},
    "stablelm": {"rope_parameters": _rope(partial_rotary_factor=0.25)},
    "persimmon": {"rope_parameters": _rope(partial_rotary_factor=0.5)},
    "nemotron": {"rope_parameters": _rope(partial_rotary_factor=0.5)},
    "starcoder2": {"sliding_window": WINDOW},
    "cohere": {},
    "cohere2": {
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    },
    "glm": {"rope_parameters": _rope(partial_rotary_factor=0.5)},
    "glm4": {"rope_parameters": _rope(partial_rotary_factor=0.5)},
    "llama4": {
        **_MOE,
        "num_hidden_layers": 4,
        "intermediate_size_mlp": 64,
        "interleave_moe_layer_step": 2,  # layers 1, 3 MoE; 0, 2 dense
        "no_rope_layer_interval": 4,  # layer 3 is NoPE (full attention), 0-2 rope (chunked attention)
        "attention_chunk_size": WINDOW,
    },
    "smollm3": {"num_hidden_layers": 4, "no_rope_layer_interval": 4},  # layer 3 is NoPE
    "exaone4": {"num_hidden_layers": 4, "sliding_window": WINDOW, "sliding_window_pattern": 4},
    "gpt_oss": {
        **_MOE,
        "num_hidden_layers": 4,  # sliding, full, sliding, full
        "sliding_window": WINDOW,
        "max_position_embeddings": 131072,  # = 32 x 4096: the default yarn rope (factor 32) stays consistent
    },
    "deepseek_v3": {
        "num_key_value_heads": 4,
        "head_dim": 8,  # deepseek's head_dim is the rope part: qk_rope_head_dim; q/k heads are 8 + 8 = 16
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
    },
    "ernie4_5": {},
    "hunyuan_v1_dense": {},
    "seed_oss": {"attention_dropout": 0.0, "residual_dropout": 0.0},
    "apertus": {"max_position_embeddings": 65536},  # = 8 x 8192: the default llama3 rope stays consistent
    "arcee": {},
    "helium": {},
    "ministral": {"sliding_window": WINDOW},
    "gptj": {"rotary_dim": 8, "n_inner": 64},  # rope on 8 of head dim 16
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 64},
    "gpt2": {"n_inner": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}

# family -> config model_type, where the causal-LM text config has another name
_MODEL_TYPE = {"gemma3": "gemma3_text", "llama4": "llama4_text"}

NOTES: dict[str, str] = {
    "llama": "baseline: half-split rope, GQA",
    "mistral": "llama + sliding window on every layer (512, never bites here)",
    "mixtral": "MoE (4 experts, top-2) + sliding window",
    "qwen2": "qkv bias, half-split rope",
    "qwen3": "per-head q/k RMSNorm before rope",
    "qwen3_moe": "qwen3 attention + MoE (4 experts, top-2)",
    "qwen2_moe": "qkv bias + MoE with shared expert",
    "gemma": "scaled embeddings, (1+w) RMSNorm, tied lm head",
    "gemma2": "sliding/global alternating, attn logit softcap: no sdpa (eager only)",
    "gemma3": "text-only; 3 sliding + 1 full layer with different rope bases (1e4 / 1e6), q/k norm",
    "phi": "partial rotary 0.5, parallel attn/MLP, LayerNorm, biases",
    "phi3": "fused qkv_proj and gate_up_proj, half-split rope",
    "phimoe": "MoE (sparsemixer top-2), LayerNorm",
    "gpt_neox": "partial rotary 0.25, fused interleaved-per-head qkv, parallel residual",
    "olmo": "non-parametric LayerNorm, optional qkv clipping",
    "olmo2": "q/k RMSNorm over the whole projection (all heads), post-norms",
    "olmo3": "olmo2 attention; 3 sliding + 1 full layer, per-layer-type rope",
    "olmoe": "olmo-style q/k norm + MoE (4 experts, top-2)",
    "granite": "attention scale = attention_multiplier (0.125, not 1/sqrt(16)); embedding/residual/logit multipliers",
    "granitemoe": "granite multipliers + MoE",
    "stablelm": "partial rotary 0.25, LayerNorm",
    "persimmon": "partial rotary 0.5, fused qkv, q/k LayerNorm, no GQA",
    "nemotron": "partial rotary 0.5, LayerNorm1p, relu2 MLP",
    "starcoder2": "biases, LayerNorm, sliding window",
    "cohere": "interleaved rope (pairs 2i, 2i+1), parallel attn/MLP, logit scale",
    "cohere2": "interleaved rope on 3 sliding layers; the full-attention layer applies no rope",
    "glm": "partial (0.5) interleaved rope, fused gate_up",
    "glm4": "glm rope (partial 0.5, interleaved) + extra post-norms",
    "llama4": "complex (interleaved) rope; 3 rope layers with chunked attn + 1 NoPE layer with temperature tuning; MoE",
    "smollm3": "NoPE every 4th layer (layer 3 of 4)",
    "exaone4": "3 sliding layers with rope + 1 global layer with no rope; q/k norm, post-norms",
    "gpt_oss": "attention sinks (no sdpa, eager only), yarn rope, sliding/full alternating, MoE",
    "deepseek_v3": "MLA (low-rank q/kv, rope on 8 of 16 q/k dims, v dim 16, interleaved rope weights), MoE",
    "ernie4_5": "interleaved rope (GLM style, full rotary)",
    "hunyuan_v1_dense": "q/k norm applied after rope",
    "seed_oss": "qkv bias, no output bias",
    "apertus": "llama3 rope scaling, xIELU MLP, q/k norm",
    "arcee": "relu2 MLP (no gate), otherwise llama",
    "helium": "interleaved rope, llama otherwise",
    "ministral": "mistral with per-layer layer_types (all sliding here)",
    "gptj": "partial interleaved rope (rotary_dim 8 of 16), parallel attn/MLP",
    "falcon": "attention does not go through the attention registry (own sdpa/eager code): must be refused",
    "gpt2": "learned absolute position embeddings, no rope: must be refused",
}

FAMILIES: tuple[str, ...] = tuple(FAMILY_KWARGS)


@functools.cache
def _config_fields(model_type: str) -> frozenset[str]:
    cls = CONFIG_MAPPING[model_type]  # configs are dataclasses
    return frozenset(f.name for f in dataclasses.fields(cls)) | frozenset(cls.attribute_map)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A small config for ``family``; ``overrides`` are passed on to the config as well."""
    model_type = _MODEL_TYPE.get(family, family)
    fields = _config_fields(model_type)
    kwargs = {k: v for k, v in COMMON.items() if k in fields}
    kwargs.update(FAMILY_KWARGS[family])
    kwargs.update(overrides)
    return CONFIG_MAPPING[model_type](**kwargs)


def tiny_model(
    family: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """Random weights drawn after ``torch.manual_seed(seed)``, cast to ``dtype``, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn_implementation)
    return model.to(dtype).eval()


@functools.cache
def supports(family: str, attn_implementation: str) -> bool:
    """Whether the family's model class accepts ``attn_implementation`` (builds it on the meta device)."""
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn_implementation)
    except (ValueError, ImportError):
        return False
    return True
