"""Retrieval in the model's own space: a small learned head that turns a model's token states into
a retrieval vector, for references (keys) and for decoding chunks (queries) alike.

A text embedder on the service's CPU dominated the retrieval step (issue 17). The model already
computes a representation of every token it reads: its input embeddings, the one state of a chunk
that no memory has touched when memories are read from layer 0 (the default), so a prompt chunk's
query is known before its own forward. :class:`RetrievalHead` takes each token's embedding
(L2-normalised) beside a fixed random code of its id (tokens the model never trained on all share
one embedding direction; the code tells them apart), pools them with a learned attention gate
(which tokens matter: mostly names), projects to ``dim`` (128) and L2-normalises. Keys come from the encoder's own forward; queries are looked up on the model's
device from the chunk's ids. A head belongs to one model and one set of weights: its space name,
``model:<fingerprint[:16]>:<head digest[:16]>``, is a bank's embedder name, and keys, queries and
banks of another model or head are refused (:class:`RetrievalSpaceError`). Why these states and
this pooling (measured): docs/design.md ("Retrieval in the model's space").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memory3.sdk.model.fingerprint import model_fingerprint

HEAD_FILENAME = "retrieval_head.safetensors"
"""Saved beside the model (``save_pretrained``'s directory)."""
SPACE_PREFIX = "model:"
"""A bank whose embedder name starts with this lives in a model's space (client-side vectors)."""
SOURCE = "input_embeddings"
POOLING = "attention"
_METADATA_KEY = "memory3.retrieval_head"


class RetrievalSpaceError(ValueError):
    """A key, query or bank of another model or head than the one in use."""


def is_model_space(embedder_name: str) -> bool:
    """Whether a bank's embedder name names a model's space (else: a text embedder)."""
    return embedder_name.startswith(SPACE_PREFIX)


@dataclass(frozen=True)
class HeadConfig:
    """What a head is: the model it belongs to, its sizes, and what it reads and how it pools."""

    model_fingerprint: str
    hidden: int
    dim: int = 128
    source: str = SOURCE
    pooling: str = POOLING
    format: int = 1
    vocab: int = 0  # rows of the token-code table (the model's vocabulary)
    token_codes: int = 0  # width of each token's fixed random code beside its embedding (0: none)


class RetrievalHead(torch.nn.Module):
    """Attention pooling + linear projection of a model's input embeddings, L2-normalised.

    >>> head = RetrievalHead.for_model(model)            # untrained; memory3 train-retriever trains it
    >>> head = RetrievalHead.load(model_dir, model)      # refused when trained for other weights
    >>> head.space                                       # 'model:3f2a…:9c1d…': the bank's embedder name
    """

    def __init__(self, config: HeadConfig, seed: int | None = 0):
        super().__init__()
        if config.source != SOURCE or config.pooling != POOLING:
            raise ValueError(f"unknown head kind: source {config.source!r}, pooling {config.pooling!r}")
        if config.hidden <= 0 or config.dim <= 0:
            raise ValueError(f"hidden and dim must be positive, got {config.hidden}, {config.dim}")
        self.config = config
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        width = config.hidden + config.token_codes
        self.gate = torch.nn.Linear(width, 1)
        self.proj = torch.nn.Linear(width, config.dim, bias=False)
        codes = torch.zeros(0, 0)
        if config.token_codes:  # fixed by the config alone: regenerated, never saved
            fixed = torch.Generator().manual_seed(0x5EED_C0DE)
            codes = torch.nn.functional.normalize(torch.randn(config.vocab, config.token_codes, generator=fixed), dim=-1)
        self.register_buffer("codes", codes, persistent=False)
        with torch.no_grad():  # a deterministic start (training reproducible from the seed)
            bound = 1 / math.sqrt(config.hidden)
            for p in (self.gate.weight, self.gate.bias, self.proj.weight):
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        # InfoNCE temperature (exp of it scales cosine logits); not part of what keys are.
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))

    @classmethod
    def for_model(cls, model: torch.nn.Module, dim: int = 128, seed: int | None = 0,
                  token_codes: int = 64) -> "RetrievalHead":
        """An untrained head for ``model`` (on its device, float32)."""
        table = model.get_input_embeddings()
        config = HeadConfig(model_fingerprint(model), int(table.embedding_dim), dim, vocab=int(table.num_embeddings),
                            token_codes=token_codes)
        return cls(config, seed).to(table.weight.device)

    # ---------------------------------------------------------------- identity
    @property
    def dim(self) -> int:
        return self.config.dim

    def digest(self) -> str:
        """SHA-256 over the config and the weights that shape keys (gate, projection) as float32."""
        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for name in ("gate.weight", "gate.bias", "proj.weight"):
            tensor = self.state_dict()[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode() + b"\0" + tensor.numpy().tobytes())
        return digest.hexdigest()

    @property
    def space(self) -> str:
        """The name of this head's vector space: a bank's embedder name (`model:<fp>:<digest>`)."""
        return f"{SPACE_PREFIX}{self.config.model_fingerprint[:16]}:{self.digest()[:16]}"

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model other than the one this head was trained for."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self.config.model_fingerprint:
            raise RetrievalSpaceError(
                f"this retrieval head belongs to model {self.config.model_fingerprint[:16]}…, the running model is "
                f"{fingerprint[:16]}…; train one for this model (memory3 train-retriever)")

    def check_bank(self, name: str, embedder_name: str, dimension: int) -> None:
        """Refuse a bank that does not live in this head's space."""
        if embedder_name != self.space:
            what = "a model space" if is_model_space(embedder_name) else "the text space"
            raise RetrievalSpaceError(
                f"bank {name!r} lives in {what} {embedder_name!r}, this retrieval head's space is {self.space!r} "
                "(another model or another head): its keys and queries are not comparable")
        if dimension != self.dim:
            raise RetrievalSpaceError(f"bank {name!r} has {dimension}-d vectors, this head makes {self.dim}-d ones")

    # ---------------------------------------------------------------- vectors
    def pool(self, states: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T, hidden) token states, (n, T) bool mask of the tokens that count and (n, T) their
        ids (for the token codes) -> (n, dim) float32 unit vectors. Every row needs at least one
        token (ValueError otherwise)."""
        if not bool(mask.any(-1).all()):
            raise ValueError("every row needs at least one token to pool")
        states = torch.nn.functional.normalize(states.to(self.proj.weight.dtype), dim=-1)
        if self.config.token_codes:
            if input_ids is None:
                raise ValueError("this head's keys need the token ids (its token codes)")
            states = torch.cat((states, self.codes[input_ids.clamp(0, self.config.vocab - 1)]), dim=-1)
        scores = self.gate(states).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("nt,nth->nh", weights, states)
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1)

    def vectors(self, model: torch.nn.Module, id_lists: Sequence[Sequence[int] | None],
                ignore_ids: Sequence[int] = ()) -> list[list[float] | None]:
        """Query vectors of token id lists (a chunk each; ``ignore_ids``, e.g. BOS/EOS/pad, do not
        count), from the model's input embeddings on its device: no forward pass. A row with no
        counted token (or None) gets None."""
        ignore = set(int(i) for i in ignore_ids)
        kept = [[int(t) for t in ids if int(t) not in ignore] if ids is not None else [] for ids in id_lists]
        rows = [i for i, ids in enumerate(kept) if ids]
        out: list[list[float] | None] = [None] * len(kept)
        if not rows:
            return out
        with torch.no_grad():
            keys = self.keys_of(model, [kept[i] for i in rows])
        for i, vector in zip(rows, keys.cpu().tolist()):
            out[i] = vector
        return out

    def keys_of(self, model: torch.nn.Module, id_lists: Sequence[Sequence[int]],
                count_from: Sequence[int] | None = None, detach_states: bool = False) -> torch.Tensor:
        """(n, dim) vectors of token id lists, every token counted from ``count_from[i]`` (default 0)
        on: the embedding lookup the model's forward starts with, then :meth:`pool`.
        ``detach_states``: no gradient reaches the model's embeddings (training the head alone)."""
        table = model.get_input_embeddings()
        device = table.weight.device
        width = max(len(ids) for ids in id_lists)
        input_ids = torch.zeros(len(id_lists), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(id_lists), width, dtype=torch.bool, device=device)
        for row, ids in enumerate(id_lists):
            input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            mask[row, (count_from[row] if count_from is not None else 0) : len(ids)] = True
        with torch.no_grad() if detach_states else contextlib.nullcontext():
            states = table(input_ids).float()
        return self.pool(states, mask, input_ids)

    # ---------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """``retrieval_head.safetensors`` in ``directory`` (beside the model), config in its metadata."""
        from safetensors.torch import save_file

        path = Path(directory) / HEAD_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={_METADATA_KEY: json.dumps(asdict(self.config), sort_keys=True)})
        return path

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module | None = None) -> "RetrievalHead":
        """The head saved in ``directory``; with ``model``, refused unless trained for it, and
        moved to its device."""
        from safetensors import safe_open

        path = Path(directory) / HEAD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {HEAD_FILENAME} in {str(directory)!r}: train one with "
                                    f"`memory3 train-retriever --model {directory}`")
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            if _METADATA_KEY not in metadata:
                raise ValueError(f"{path} is not a memory3 retrieval head (no {_METADATA_KEY} metadata)")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        head = cls(HeadConfig(**json.loads(metadata[_METADATA_KEY])), seed=None)
        head.load_state_dict(tensors)
        if model is not None:
            head.check_model(model)
            head.to(model.get_input_embeddings().weight.device)
        return head.eval()


def load_retrieval_head(directory: str | Path, model: torch.nn.Module | None = None) -> RetrievalHead | None:
    """The head saved beside a model, or None when it has none."""
    if not (Path(directory) / HEAD_FILENAME).is_file():
        return None
    return RetrievalHead.load(directory, model)
