"""Memory encoder: reference texts -> sparse explicit memories, computed by the model itself.

Memory3 (arXiv 2407.01178) keeps of each reference only the tokens that receive the most attention.
:class:`MemoryEncoder` runs the model's own forward on each reference alone (marker prefix, positions
from :func:`memory3.sdk.model.positions.reference_position_ids`), captures each memory layer's keys and values
through :func:`memory3.sdk.model.attention.attention_hook`, scores every token per KV head by the
attention it receives with RoPE undone, and keeps the top ``spec.tokens_per_head`` (ties within
:data:`TIE_TOLERANCE` go to the earlier token, :func:`rank_with_ties`). A reference too short to fill
them raises :class:`ReferenceTooShortError`: filler tokens would change what the reader attends to.
With a :class:`~memory3.sdk.memory.retrieval_head.RetrievalHead`, the same forward also gives each
memory its retrieval key (``ExplicitMemory.retrieval_key``) from the input embeddings it computes.
A model carrying peft adapters encodes with them disabled: memories are always the base's
(:mod:`memory3.sdk.model.adapters`).

Details: docs/design.md ("Encoding: top-k tokens per KV head by attention received");
measurements: docs/experiments.md ("Encoder throughput").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from memory3.core.memory_spec import REFERENCE_MARKER, MemorySpec
from memory3.sdk.memory.retrieval_head import RetrievalHead
from memory3.sdk.memory.self_check import require_exact_reading
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.attention import attention_hook
from memory3.sdk.model.adapters import adapters_disabled
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import probe_geometry, reference_position_ids
from memory3.sdk.model.precision import float32_compute

TIE_TOLERANCE = 1e-4
"""Log scores closer than this (relative 1e-4 in attention received) are treated as equal."""


def rank_with_ties(log_weight: torch.Tensor, tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """Token indices ordered by score, descending; among tied scores the earlier token first.

    Ties are real: in layer 0 a pre-RoPE key depends on the token alone, so repeated tokens score
    the same, but float32 rounding (which differs with batch shape) would otherwise decide between
    them and padded batches would not match one-by-one runs. Neighbours in sorted order closer
    than ``tolerance`` form one group; groups keep their score order, tokens inside a group their
    position order.
    """
    values, order = log_weight.sort(dim=-1, descending=True, stable=True)
    gaps = values[..., :-1] - values[..., 1:]  # >= 0; NaN between two -inf (both excluded)
    new_group = torch.cat((torch.zeros_like(gaps[..., :1], dtype=torch.bool), gaps > tolerance), dim=-1)
    group = new_group.long().cumsum(-1)
    key = group * log_weight.shape[-1] + order
    return order.gather(-1, key.argsort(dim=-1))


class ReferenceTooShortError(ValueError):
    """A reference has fewer selectable tokens than the spec keeps per head."""


class _StopForward(Exception):
    """Raised from the last memory layer: later layers and the LM head are not needed."""


class MemoryEncoder:
    """Encodes references into :class:`ExplicitMemory` objects with a model and its tokenizer.

    Without a tokenizer only :meth:`encode_ids` works (token ids the caller made, no marker).
    ``retrieval_head`` (trained for this model) adds a retrieval key to every memory, from the same
    forward: the head pools the input embeddings of the reference's text tokens (marker excluded).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: MemorySpec, batch_size: int = 16,
                 self_check: bool = True, retrieval_head: RetrievalHead | None = None,
                 adapters_encode: bool = False):
        # adapters_encode: keep a peft adapter active while encoding (training an adapter that also
        # encodes, memory3.trainer.adapt's memories="adapted"): such memories are the adapted
        # model's, not its base's, and belong in a bank of the merged model (load_adapter merges it)
        self.adapters_encode = adapters_encode
        geometry = probe_geometry(model)
        geometry.check_spec(spec)
        if self_check:
            require_exact_reading(model)
        if retrieval_head is not None:
            retrieval_head.check_model(model)
        self.retrieval_head = retrieval_head
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.batch_size = batch_size
        self.rotations = {layer: geometry.rotations[layer] for layer in spec.memory_layers}
        bos = getattr(tokenizer, "bos_token_id", None)
        marker = tokenizer(REFERENCE_MARKER, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
        self.prefix_ids: list[int] = ([bos] if bos is not None else []) + list(marker)
        if len(self.prefix_ids) + spec.tokens_per_head > spec.reference_length:
            raise ValueError(
                f"marker ({len(self.prefix_ids)} tokens) + {spec.tokens_per_head} kept tokens exceed "
                f"reference_length {spec.reference_length}"
            )
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._query_valid: torch.Tensor | None = None
        self._selectable: torch.Tensor | None = None
        self._embedded: torch.Tensor | None = None  # the forward's input embeddings (retrieval keys)
        self._differentiable = False  # set only by encode_differentiable

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each reference: prefix (BOS + marker) + text, truncated to the spec."""
        if self.tokenizer is None:
            raise ValueError("this encoder has no tokenizer: pass token ids to encode_ids")
        budget = self.spec.reference_length - len(self.prefix_ids)
        bodies = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [self.prefix_ids + list(body[:budget]) for body in bodies]

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> list[ExplicitMemory]:
        """One memory per text, in input order. Batches group similar lengths to limit padding."""
        batch_size = batch_size or self.batch_size
        sequences = self.tokenize(texts)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[ExplicitMemory | None] = [None] * len(sequences)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = self.pad([sequences[i] for i in chunk])
            for i, memory in zip(chunk, self.encode_ids(input_ids, attention_mask)):
                out[i] = memory
        return out  # type: ignore[return-value]

    def encode_differentiable(self, texts: Sequence[str], batch_size: int | None = None) -> list[ExplicitMemory]:
        """:meth:`encode`, but with autograd on: the memories' K/V are a function of the weights.

        For training only (the trainer's stage 2): the loss of text that reads a memory then also
        teaches the *encoding* side — how the reference's keys are made so they are found, and its
        values so they carry the answer. The top-k *selection* stays a hard, non-differentiable
        choice; gradients flow through the kept tokens' K/V. Same tokens, same numbers as
        :meth:`encode`; the model stays in eval mode during the forward, as there.
        """
        self._differentiable = True
        try:
            return self.encode(texts, batch_size)
        finally:
            self._differentiable = False

    def retrieval_keys(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) retrieval keys of texts without encoding them (for references too short to
        keep a memory): the same tokens and numbers as the keys :meth:`encode` gives, from the
        embedding lookup alone. Every text needs at least one token."""
        if self.retrieval_head is None:
            raise ValueError("this encoder has no retrieval head")
        sequences = self.tokenize(texts)
        with torch.no_grad():
            return self.retrieval_head.keys_of(self.model, sequences, [len(self.prefix_ids)] * len(sequences))

    def pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into (input_ids, attention_mask) on the model's device."""
        device = next(self.model.parameters()).device
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return input_ids, attention_mask

    # ------------------------------------------------------------------ model
    def encode_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prefix_length: int | None = None
    ) -> list[ExplicitMemory]:
        """Memories of right-padded token ids that already start with the prefix (BOS + marker).

        input_ids, attention_mask: (batch, tokens), tokens <= spec.reference_length; the mask is
        1 for real tokens, then 0 for padding. ``prefix_length`` tokens at the start are never
        selected (default: this encoder's BOS + marker).
        """
        spec = self.spec
        prefix_length = len(self.prefix_ids) if prefix_length is None else prefix_length
        batch, length = input_ids.shape
        if length > spec.reference_length:
            raise ValueError(f"references have {length} tokens, the spec allows {spec.reference_length}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.to(torch.bool)
        lengths = real.sum(-1)
        if not torch.equal(real, torch.arange(length, device=real.device)[None, :] < lengths[:, None]):
            raise ValueError("references must be right-padded: attention_mask ones, then zeros")
        selectable = real.clone()
        selectable[:, :prefix_length] = False
        short = (selectable.sum(-1) < spec.tokens_per_head).nonzero().flatten().tolist()
        if short:
            raise ReferenceTooShortError(
                f"references {short} have fewer than {spec.tokens_per_head} tokens after the marker "
                f"(text tokens: {[int(lengths[i]) - prefix_length for i in short]})"
            )

        fingerprint = model_fingerprint(self.model)
        self._kept, self._query_valid, self._selectable = {}, real, selectable
        was_training = self.model.training
        self.model.eval()
        watch = None
        if self.retrieval_head is not None:  # the forward's own input embeddings, for the keys
            watch = self.model.get_input_embeddings().register_forward_hook(self._embeddings)
        try:
            grad_mode = torch.enable_grad() if self._differentiable else torch.inference_mode()
            base_only = contextlib.nullcontext() if self.adapters_encode else adapters_disabled(self.model)
            with grad_mode, base_only, float32_compute(self.model), \
                    attention_hook(self.model, self._capture):
                try:
                    self.model(
                        input_ids=input_ids,
                        position_ids=reference_position_ids(length, input_ids.device).expand(batch, -1),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                found = [None] * batch
                if watch is not None:
                    found = list(self.retrieval_head.pool(self._embedded, selectable, input_ids))
            kept = [self._kept[slot] for slot in range(len(spec.memory_layers))]
        finally:
            if watch is not None:
                watch.remove()
            self.model.train(was_training)
            self._query_valid = self._selectable = self._embedded = None
            self._kept = {}

        keys = torch.stack([k for k, _, _ in kept], dim=1)  # (batch, layers, kv heads, tokens, dim)
        values = torch.stack([v for _, v, _ in kept], dim=1)
        positions = torch.stack([p for _, _, p in kept], dim=1)  # (batch, layers, kv heads, tokens)
        kv = torch.stack((keys, values), dim=2)  # (batch, layers, 2, kv heads, tokens, dim)
        return [ExplicitMemory(kv[b].clone(), positions[b].clone(), fingerprint,
                               found[b].clone() if found[b] is not None else None) for b in range(batch)]

    def _embeddings(self, module, args, output) -> None:
        """Forward hook on the input embedding table: keep what the forward computed."""
        self._embedded = output

    def _capture(self, base_fn, base_name, module, query, key, value, attention_mask, **kwargs):
        """Attention hook: select a memory layer's tokens; stop after the last memory layer."""
        layer = module.layer_idx
        slot = self.spec.layer_slot(layer)
        if slot is not None:
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            self._kept[slot] = self.select(query, key, value, scaling, layer)
            if layer == max(self.spec.memory_layers):
                raise _StopForward
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    def select(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k tokens per KV head by attention received; returns kept (keys, values, positions).

        query (batch, heads, T, dim), key/value (batch, kv heads, T, dim), all post-RoPE at
        positions 0..T-1. Output keys/values (batch, kv heads, k, dim), positions (batch, kv heads, k).
        """
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        positions = reference_position_ids(length, query.device)[0]
        rotation = self.rotations[layer]
        q = rotation.unrotate(query, positions).view(batch, kv_heads, heads // kv_heads, length, dim)
        k = rotation.unrotate(key, positions)
        logits = torch.einsum("bhgid,bhjd->bhgij", q, k) * scaling  # (batch, kv heads, group, i, j)
        query_valid = self._query_valid[:, None, None, :, None]
        logits = logits.masked_fill(~query_valid, float("-inf"))
        log_weight = torch.logsumexp(logits, dim=(2, 3))  # (batch, kv heads, j)
        log_weight = log_weight.masked_fill(~self._selectable[:, None, :], float("-inf"))
        top = rank_with_ties(log_weight)[..., : self.spec.tokens_per_head].sort(dim=-1).values
        index = top[..., None].expand(-1, -1, -1, dim)
        return key.gather(2, index), value.gather(2, index), top
