"""Quantization-aware reading: stage 2 with every memory seen as a PQ codebook returns it.

At the >= 500x budget a codebook's error moves the small reference model's answers: it was
trained on exact memories. A stage with ``pq_bytes > 0`` (:class:`~memory3.trainer.config.StageConfig`)
trains the reader on what a bank would hand it: each memory a chunk reads is coded and decoded
(:class:`CodebookRoundTrip`) by a codebook trained, as a bank trains one, on memories of another
generated world (:data:`SAMPLE_WORLD_SEED_OFFSET`), encoded with the current weights and retrained
every ``pq_refresh`` steps. Gradients pass the round trip unchanged (straight-through). The codec
and file formats are untouched; only the weights differ.

Measurements: docs/experiments.md
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.pq import PQCodebook, train_codebook
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.positions import probe_geometry

from .corpus import World, build_world

SAMPLE_WORLD_SEED_OFFSET = 1
"""Codebook samples come from the world generated with the run's world seed plus this: same
generator, other entities, so no codebook is fitted on the memories it is judged (or trained) on."""


def sample_references(world: World, n: int) -> list[str]:
    """``n`` references of another generated world (:data:`SAMPLE_WORLD_SEED_OFFSET`), for codebooks."""
    sample_world = build_world(world.seed + SAMPLE_WORLD_SEED_OFFSET, n, 0.2, passages_per_entity=0)
    return [r.text for r in sample_world.references]


def round_trip(memories: Sequence[ExplicitMemory], codebook: PQCodebook) -> list[ExplicitMemory]:
    """Each memory coded and decoded by ``codebook``; values are the decoded ones, gradients pass
    to the originals unchanged (straight-through). One encode/decode for the whole list."""
    if not memories:
        return []
    kv = torch.cat([m.kv for m in memories], dim=3)  # tokens of every memory side by side
    positions = torch.cat([m.positions for m in memories], dim=2)
    decoded = codebook.decode(codebook.encode(kv, positions), positions, dtype=kv.dtype, device=kv.device).clone()
    coded = kv + (decoded - kv).detach()
    sizes = [m.kv.shape[3] for m in memories]
    return [ExplicitMemory(part, m.positions, m.fingerprint) for part, m in zip(coded.split(sizes, dim=3), memories)]


class CodebookRoundTrip:
    """Codes a training step's memories with a codebook that follows the weights being trained.

    The codebook is not checkpointed: a resumed run trains one at the step it resumes from, so it
    matches an uninterrupted run only when it resumes on a refresh boundary."""

    def __init__(self, encoder: MemoryEncoder, sample_texts: Sequence[str], bytes_per_vector: int,
                 quantizer: str = "residual", refresh: int = 50, kmeans_iters: int = 15):
        self.encoder = encoder
        self.sample_texts = list(sample_texts)
        self.bytes_per_vector = bytes_per_vector
        self.quantizer = quantizer
        self.refresh = refresh
        self.kmeans_iters = kmeans_iters
        self.key_rope = probe_geometry(encoder.model).codebook_angles(encoder.spec.memory_layers)
        self.codebook: PQCodebook | None = None
        self.steps_since_training = 0

    def train(self) -> PQCodebook:
        """A codebook for the current weights, from the sample encoded now (no gradients)."""
        with torch.no_grad():
            sample = self.encoder.encode(self.sample_texts)
        self.codebook = train_codebook(sample, self.bytes_per_vector, version=1, kmeans_iters=self.kmeans_iters,
                                       key_rope=self.key_rope, quantizer=self.quantizer)
        self.steps_since_training = 0
        return self.codebook

    def __call__(self, memories: Sequence[ExplicitMemory]) -> list[ExplicitMemory]:
        """One training step's memories, coded; retrains the codebook first when it is due."""
        if self.codebook is None or self.steps_since_training >= self.refresh:
            self.train()
        self.steps_since_training += 1
        return round_trip(memories, self.codebook)
