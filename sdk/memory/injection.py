"""Memory injection: explicit memories read into a Hugging Face causal LM's attention, no fork.

:class:`MemoryInjector` switches the model to the memory3 attention wrapper of its implementation
(:mod:`memory3.sdk.model.attention`) and, in memory layers, puts the current memories' K/V in
front of the context's K/V with mask columns so every query sees every real memory slot (or, with
``visible``, the slots it may see); padded slots are masked and other layers are untouched. The KV
cache only ever holds the context, so memories can be swapped every 64 tokens without touching it.
Memory keys are rotated once, at :meth:`MemoryInjector.set_memories`, to the parallel positions of
:func:`memory3.sdk.model.positions.memory_key_shift`; a left-padded direct forward must pass
``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)``. An opt-in retrieval prior adds
``retrieval_bias * (score - best score)`` to each memory's logits. Details: docs/design.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from memory3.core.memory_spec import MemorySpec
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.attention import attention_hook
from memory3.sdk.memory.self_check import require_exact_reading
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_key_shift, probe_geometry


def _sdpa_would_be_causal(base_name: str, module: torch.nn.Module, q_len: int, kwargs: dict) -> bool:
    """Whether the wrapped sdpa would apply its own causal mask to a None mask (its own rule)."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return base_name == "sdpa" and q_len > 1 and bool(is_causal)


def _context_mask(attention_mask, base_name, module, query, kv_len, kwargs) -> torch.Tensor:
    """The context part of the mask as a 4D tensor, materialised where the model passed None.

    None means: eager — attend everywhere; sdpa — causal when there is more than one query and the
    layer is causal, else attend everywhere. The causal mask is what torch's ``is_causal`` applies:
    aligned top-left (query i sees keys 0..i), which matters when a static cache makes the keys
    longer than the queries at prefill.
    """
    if attention_mask is not None:
        return attention_mask
    q_len, device = query.shape[2], query.device
    if _sdpa_would_be_causal(base_name, module, q_len, kwargs):
        allowed = torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None]
    else:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    allowed = allowed.view(1, 1, q_len, kv_len)
    if base_name == "eager":
        return torch.zeros(allowed.shape, dtype=query.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )
    return allowed


def extend_mask(
    attention_mask: torch.Tensor | None,
    base_name: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    kv_len: int,
    slot_valid: torch.Tensor,
    kwargs: dict,
    slot_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Prepend memory columns to the attention mask: real memory slots visible to every query.

    ``slot_valid``: (batch, memory slots) bool, or (batch, queries, memory slots) for per-query
    visibility. Keeps the mask's kind (bool for sdpa, additive
    float for eager) and returns None when no mask is needed at all (decoding one token with every
    slot real and no padding), so sdpa keeps its fastest path. ``slot_bias`` (batch, memory slots)
    adds to the logits of the memory slots; the mask is then additive float for both kinds.
    """
    batch, q_len = query.shape[0], query.shape[2]
    if (attention_mask is None and slot_bias is None and bool(slot_valid.all())
            and not _sdpa_would_be_causal(base_name, module, q_len, kwargs)):
        return None
    ctx = _context_mask(attention_mask, base_name, module, query, kv_len, kwargs)
    if ctx.shape[-1] != kv_len:
        raise ValueError(f"attention mask covers {ctx.shape[-1]} keys but the layer has {kv_len}")
    if slot_bias is not None and ctx.dtype == torch.bool:
        ctx = torch.zeros(ctx.shape, dtype=query.dtype, device=ctx.device).masked_fill(~ctx, torch.finfo(query.dtype).min)
    rows = max(batch, ctx.shape[0])
    heads = ctx.shape[1]
    mem = (slot_valid[:, None] if slot_valid.dim() == 3 else slot_valid[:, None, None, :]).to(ctx.device)
    if ctx.dtype != torch.bool:
        bias = 0.0 if slot_bias is None else slot_bias[:, None, None, :].to(device=ctx.device, dtype=ctx.dtype)
        mem = (torch.zeros(mem.shape, dtype=ctx.dtype, device=ctx.device) + bias).masked_fill(
            ~mem, torch.finfo(ctx.dtype).min)
    mem = mem.expand(rows, heads, q_len, slot_valid.shape[-1])
    return torch.cat((mem, ctx.expand(rows, heads, q_len, kv_len)), dim=-1)


class MemoryInjector:
    """Reads explicit memories into a causal LM's memory layers while it runs.

    >>> with MemoryInjector(model, spec) as injector:
    ...     injector.set_memories([[m1, m2, m3], [m4]])   # one list per batch row
    ...     out = model.generate(**batch)

    Memories may be replaced or cleared between calls; with none set (or all rows empty) the model
    computes exactly what it computes without the injector. When the batch has ``n`` times the rows
    memories were set for (beam search, ``num_return_sequences``), row ``b``'s memories serve rows
    ``b*n .. b*n+n-1``, as ``generate`` lays them out. ``verify_fingerprint`` refuses
    memories encoded by a different model (config or weights). ``retrieval_bias`` > 0 turns on the
    retrieval prior (module docstring) for memories set with their ``scores``.
    """

    def __init__(self, model: torch.nn.Module, spec: MemorySpec, verify_fingerprint: bool = True,
                 retrieval_bias: float = 0.0, self_check: bool = True):
        if not 0 <= retrieval_bias < float("inf"):
            raise ValueError(f"retrieval_bias must be finite and >= 0, got {retrieval_bias}")
        geometry = probe_geometry(model)
        geometry.check_spec(spec)
        if self_check:
            require_exact_reading(model)
        self.model = model
        self.spec = spec
        self.rotations = [geometry.rotations[layer] for layer in spec.memory_layers]
        self.verify_fingerprint = verify_fingerprint
        self.retrieval_bias = float(retrieval_bias)
        self._context: contextlib.AbstractContextManager | None = None
        self._keys: torch.Tensor | None = None  # (memory layers, batch, kv heads, slots, head dim)
        self._values: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # (batch, slots) or (batch, queries, slots) bool
        self._bias: torch.Tensor | None = None  # (batch, slots) float32 retrieval prior, or None
        self._mask_cache: tuple | None = None  # (context mask object, shape key, extended mask)
        self.counts: list[int] = []

    # ---------------------------------------------------------------- lifecycle
    def activate(self) -> "MemoryInjector":
        if self._context is not None:
            raise RuntimeError("injector is already active")
        context = attention_hook(self.model, self._attend)
        context.__enter__()
        self._context = context
        return self

    def deactivate(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
        self.clear()

    def __enter__(self) -> "MemoryInjector":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @property
    def active(self) -> bool:
        return self._context is not None

    # ---------------------------------------------------------------- memories
    def clear(self) -> None:
        """Drop all memories: the model runs as if there were none."""
        self._keys = self._values = self._valid = self._bias = None
        self._mask_cache = None
        self.counts = []

    def set_memories(self, memories: Sequence[Sequence[ExplicitMemory]],
                     scores: Sequence[Sequence[float]] | None = None,
                     visible: torch.Tensor | None = None) -> None:
        """Use these memories from now on: ``memories[b]`` for batch row ``b`` (any count each).

        Rows with fewer memories get masked slots. Keys are rotated to parallel positions here,
        once, and everything is moved to the model's dtype and device. ``scores`` (one per memory,
        higher = more relevant, as retrieval returns them) feed the retrieval prior when
        ``retrieval_bias`` > 0 (and are not looked at otherwise); without them, or at 0, every
        memory is read alike.

        ``visible`` (bool, (batch, queries, max memories per row)) restricts which memories each
        query position reads: query ``q`` of row ``b`` sees memory ``i`` only where
        ``visible[b, q, i]``. Forwards must then have exactly ``queries`` query positions (a
        training forward over whole rows); without it every query sees every memory of its row.
        """
        memories = [list(row) for row in memories]
        counts = [len(row) for row in memories]
        if visible is not None:
            want = (len(memories), max(counts, default=0))
            if visible.dtype != torch.bool or visible.dim() != 3 or (visible.shape[0], visible.shape[2]) != want:
                raise ValueError(f"visible must be a bool tensor (batch, queries, memories) = ({want[0]}, q, {want[1]}), "
                                 f"got {visible.dtype} {tuple(visible.shape)}")
        if scores is not None and self.retrieval_bias > 0:  # read only by the prior
            if [len(row) for row in scores] != counts:
                raise ValueError(f"scores per row {[len(row) for row in scores]} do not match memories per row {counts}")
            for b, row in enumerate(scores):
                if not all(math.isfinite(x) for x in row):
                    raise ValueError(f"scores of row {b} are not all finite: {list(row)}")
        if not counts or max(counts) == 0:
            self.clear()
            self.counts = counts
            return
        expected = self.spec.shape
        fingerprint = model_fingerprint(self.model) if self.verify_fingerprint else None
        for b, row in enumerate(memories):
            for i, memory in enumerate(row):
                if tuple(memory.kv.shape) != expected:
                    raise ValueError(
                        f"memory {i} of row {b} has shape {tuple(memory.kv.shape)}, the spec needs {expected}"
                    )
                if fingerprint is not None and memory.fingerprint != fingerprint:
                    raise ValueError(
                        f"memory {i} of row {b} belongs to model {memory.fingerprint[:16]}…, "
                        f"the running model is {fingerprint[:16]}…; re-encode it with this model"
                    )
        param = next(self.model.parameters())
        dtype, device = param.dtype, param.device
        n_layers, _, kv_heads, tokens, head_dim = expected
        slots = max(counts) * tokens
        keys = torch.zeros(n_layers, len(memories), kv_heads, slots, head_dim, dtype=torch.float32, device=device)
        values = torch.zeros_like(keys)
        valid = torch.zeros(len(memories), slots, dtype=torch.bool, device=device)
        for b, row in enumerate(memories):
            if not row:
                continue
            kv = torch.stack([m.kv.to(device=device, dtype=torch.float32) for m in row])  # (n, L, 2, H, k, D)
            # (n, L, H, k, D) -> (L, H, n * k, D): memory-major slots.
            keys[:, b, :, : len(row) * tokens] = kv[:, :, 0].permute(1, 2, 0, 3, 4).reshape(n_layers, kv_heads, -1, head_dim)
            values[:, b, :, : len(row) * tokens] = kv[:, :, 1].permute(1, 2, 0, 3, 4).reshape(n_layers, kv_heads, -1, head_dim)
            valid[b, : len(row) * tokens] = True
        shift = memory_key_shift(self.spec)
        keys = torch.stack([rotation.rotate(layer_keys, shift) for rotation, layer_keys in zip(self.rotations, keys)])
        if visible is not None:  # memory-level -> slot-level, per query position
            valid = valid[:, None, :] & visible.to(device).repeat_interleave(tokens, dim=2)
        self._keys, self._values, self._valid = keys.to(dtype), values.to(dtype), valid
        self._bias = None
        if scores is not None and self.retrieval_bias > 0:
            bias = torch.zeros(len(memories), slots, dtype=torch.float32)
            for b, row in enumerate(scores):
                if row:
                    relative = torch.tensor(row, dtype=torch.float32) - max(row)
                    bias[b, : len(row) * tokens] = (self.retrieval_bias * relative).repeat_interleave(tokens)
            self._bias = bias.to(device)
        self._mask_cache = None
        self.counts = counts

    # ---------------------------------------------------------------- the hook
    def _attend(self, base_fn, base_name, module, query, key, value, attention_mask, **kwargs):
        slot = self.spec.layer_slot(module.layer_idx)
        if slot is None or self._keys is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        mem_k, mem_v, valid, bias = self._keys[slot], self._values[slot], self._valid, self._bias
        batch = query.shape[0]
        rows = mem_k.shape[0]
        if rows != batch:  # beams / return sequences: generate repeats each row in place
            if batch % rows:
                raise ValueError(f"memories were set for {rows} rows but the batch has {batch}, not a multiple")
            copies = batch // rows
            mem_k, mem_v = mem_k.repeat_interleave(copies, 0), mem_v.repeat_interleave(copies, 0)
            valid = valid.repeat_interleave(copies, 0)
            bias = bias.repeat_interleave(copies, 0) if bias is not None else None
        if valid.dim() == 3 and valid.shape[1] != query.shape[2]:
            raise ValueError(f"memory visibility covers {valid.shape[1]} queries, the forward has {query.shape[2]}")
        # All memory layers of one forward get the same mask object: extend it once per forward.
        cache_key = (base_name, query.shape[0], query.shape[2], key.shape[2], query.dtype, query.device)
        cached = self._mask_cache
        if cached is not None and cached[0] is attention_mask and cached[1] == cache_key:
            mask = cached[2]
        else:
            mask = extend_mask(attention_mask, base_name, module, query, key.shape[2], valid, kwargs, bias)
            self._mask_cache = (attention_mask, cache_key, mask)
        key = torch.cat((mem_k.to(key.dtype), key), dim=2)
        value = torch.cat((mem_v.to(value.dtype), value), dim=2)
        return base_fn(module, query, key, value, mask, **kwargs)
