"""Product quantization of memory key/value vectors: the codebook and how to train it.

Memory3 (arXiv 2407.01178) codes each key/value vector of a memory in a few bytes with OPQ-PQ. A
codebook is trained per bank on a sample of its memories and versioned; a PQ memory names the
version and digest it was coded with, so it is never decoded with other centroids
(:mod:`memory3.sdk.memory.codec`). Per vector: 1. subtract the per-(layer, K/V, head) mean; 2. rotate
(OPQ, one rotation per group); 3. store ``M`` bytes, the nearest of 256 centroids per subvector;
optionally 4. code keys rotated back to position 0 (``key_rope``) and 5. use ``M`` full-dimension
residual stages instead of subvectors (``quantizer="residual"``). No per-vector norm is stored (every
byte counts against the storage budget). Training is deterministic k-means in torch (no faiss).

Details: docs/design.md ("PQ codebook format"); measurements: docs/experiments.md ("PQ codebooks").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from memory3.core.codebook_format import (
    CENTROIDS,
    QUANTIZERS,
    SHARE_MODES,
    CodebookArrays,
    CodebookError,
    CodebookHeader,
    canonical_format,
    check_shape,
    codebook_digest,
    pack_codebook,
    read_codebook,
    with_checksum,
)
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.positions import rotate_halves


def subvector_sizes(head_dim: int, subvectors: int) -> tuple[int, ...]:
    """Split ``head_dim`` into ``subvectors`` contiguous pieces whose sizes differ by at most one."""
    if not 1 <= subvectors <= head_dim:
        raise ValueError(f"bytes_per_vector must be in [1, {head_dim}], got {subvectors}")
    base, extra = divmod(head_dim, subvectors)
    return tuple(base + 1 if m < extra else base for m in range(subvectors))


@dataclass(eq=False)
class PQCodebook:
    """OPQ codebook for one bank (one model, one memory shape).

    version:     bank-assigned version; a PQ memory records the version it needs.
    fingerprint: the model fingerprint of the memories it was trained on.
    mean:        (layers, 2, kv heads, head dim) float32, subtracted before rotation.
    rotation:    (groups, head dim, head dim) float32, orthogonal; ``y = x @ R``.
    centroids:   product: (groups, 256, head dim) float32; subvector ``m`` owns columns
                 ``offsets[m] : offsets[m] + sizes[m]``. residual: (groups, M * 256, head dim);
                 stage ``m`` owns rows ``m * 256 : (m + 1) * 256``.
    share:       ``"layer"`` (group = layer x K/V) or ``"kv"`` (group = K/V).
    key_rope:    RoPE frequencies (``inv_freq``, float32) when keys are coded without their position
                 (step 4 of the module docstring); ``None``: keys are coded as stored.
    quantizer:   ``"product"`` or ``"residual"`` (:data:`QUANTIZERS`).
    """

    version: int
    fingerprint: str
    mean: torch.Tensor
    rotation: torch.Tensor
    centroids: torch.Tensor
    subvectors: int
    share: str = "layer"
    key_rope: torch.Tensor | None = None
    quantizer: str = "product"
    _digest: bytes | None = field(default=None, repr=False)
    _padded_centroids: torch.Tensor | None = field(default=None, repr=False)
    _decode_rows: torch.Tensor | None = field(default=None, repr=False)
    _rope_cos: torch.Tensor | None = field(default=None, repr=False)
    _rope_sin: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.share not in SHARE_MODES:
            raise CodebookError(f"unknown share mode {self.share!r}, expected one of {SHARE_MODES}")
        if not 0 < int(self.version) < 2**32:
            raise CodebookError(f"codebook version must be in [1, 2**32), got {self.version}")
        layers, _, heads, dim = self.mean.shape
        groups = self.groups_for(layers)
        if tuple(self.rotation.shape) != (groups, dim, dim):
            raise CodebookError(f"rotation shape {tuple(self.rotation.shape)} != {(groups, dim, dim)}")
        if self.quantizer not in QUANTIZERS:
            raise CodebookError(f"unknown quantizer {self.quantizer!r}, expected one of {QUANTIZERS}")
        subvector_sizes(dim, self.subvectors)
        want = (groups, CENTROIDS * (self.subvectors if self.residual else 1), dim)
        if tuple(self.centroids.shape) != want:
            raise CodebookError(f"centroids shape {tuple(self.centroids.shape)} != {want}")
        self.mean = self.mean.float().contiguous()
        self.rotation = self.rotation.float().contiguous()
        self.centroids = self.centroids.float().contiguous()
        if self.key_rope is not None:
            self.key_rope = torch.as_tensor(self.key_rope, dtype=torch.float32).flatten().contiguous()
            if not 0 < self.key_rope.numel() <= dim // 2:
                raise CodebookError(f"{self.key_rope.numel()} RoPE frequencies for head dim {dim}")

    # ---- shape -------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return int(self.mean.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.mean.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.mean.shape[3])

    @property
    def bytes_per_vector(self) -> int:
        return self.subvectors

    @property
    def residual(self) -> bool:
        return self.quantizer == "residual"

    @property
    def sizes(self) -> tuple[int, ...]:
        return subvector_sizes(self.head_dim, self.subvectors)

    def _encode_table(self) -> torch.Tensor:
        """Cached padded centroids (G, M, K, dmax) for nearest-centroid search."""
        if self._padded_centroids is None:
            groups = range(self.centroids.shape[0])
            self._padded_centroids = torch.stack([_padded(self.centroids[g], self.sizes) for g in groups])
        return self._padded_centroids

    def _decode_table(self) -> torch.Tensor:
        """Cached (G * M * K, D) rows: centroid k of subvector (residual: stage) m of group g, rotated back.

        Decoding is then one fused gather-and-sum per vector (``embedding_bag``) instead of a
        gather, a column shuffle and a D x D matmul: faster, for a table M times the codebook's size
        (docs/experiments.md, "PQ decode: one gather-and-sum").
        """
        if self._decode_rows is None and self.residual:  # stage rows are whole vectors: rotate each back
            self._decode_rows = torch.bmm(self.centroids, self.rotation.transpose(1, 2)).reshape(-1, self.head_dim)
        if self._decode_rows is None:
            rows, offset = [], 0
            for size in self.sizes:
                block = slice(offset, offset + size)
                # y @ R^T summed over subvectors: subvector m contributes y[:, block] @ R[:, block]^T
                rows.append(torch.bmm(self.centroids[:, :, block], self.rotation[:, :, block].transpose(1, 2)))
                offset += size
            self._decode_rows = torch.stack(rows, 1).reshape(-1, self.head_dim).contiguous()  # (G, M, K, D)
        return self._decode_rows

    def groups_for(self, layers: int) -> int:
        return layers * 2 if self.share == "layer" else 2

    @property
    def digest(self) -> bytes:
        """First 8 bytes of SHA-256 over the serialized codebook: names its exact content."""
        if self._digest is None:
            self._digest = codebook_digest(self._body())
        return self._digest

    def _group_view(self, x: torch.Tensor) -> torch.Tensor:
        """(layers, 2, heads, tokens, C) -> (groups, heads * tokens [* layers], C)."""
        layers, _, heads, tokens, dim = x.shape
        if self.share == "layer":
            return x.reshape(layers * 2, heads * tokens, dim)
        return x.transpose(0, 1).reshape(2, layers * heads * tokens, dim)

    def _ungroup(self, y: torch.Tensor, layers: int, heads: int, tokens: int) -> torch.Tensor:
        dim = y.shape[-1]
        if self.share == "layer":
            return y.reshape(layers, 2, heads, tokens, dim)
        return y.reshape(2, layers, heads, tokens, dim).transpose(0, 1)

    # ---- encode / decode ---------------------------------------------------------------------
    def check_shape(self, layers: int, heads: int, head_dim: int) -> None:
        check_shape(self.version, (self.layers, self.kv_heads, self.head_dim), (layers, heads, head_dim))

    def _move_keys(self, kv: torch.Tensor, positions: torch.Tensor | None, sign: int) -> torch.Tensor:
        """Keys rotated by ``sign * positions`` (to position 0 and back) when the codebook codes
        keys without their position, in place on ``kv`` (a float32 tensor the caller owns); ``kv``
        unchanged otherwise. The rotation is :func:`~memory3.sdk.model.positions.rotate_halves`,
        from a cached table of cos/sin per position (computing the angles per call, as
        :meth:`~memory3.sdk.model.positions.LayerRotation.rotate` does, slows PQ decoding markedly)."""
        if self.key_rope is None:
            return kv
        if positions is None:
            raise CodebookError(f"codebook v{self.version} codes keys without their position: positions are needed")
        if tuple(positions.shape) != (kv.shape[0], kv.shape[2], kv.shape[3]):
            raise CodebookError(f"positions shape {tuple(positions.shape)} does not match kv {tuple(kv.shape)}")
        positions = positions.to("cpu", torch.long)
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope_cos is None or self._rope_cos.shape[0] < needed:
            angles = torch.arange(max(needed, 256), dtype=torch.float64)[:, None] * self.key_rope.double()
            self._rope_cos, self._rope_sin = angles.cos().float(), angles.sin().float()
        cos, sin = self._rope_cos[positions], self._rope_sin[positions] * sign  # (L, H, T, half)
        half = self.key_rope.numel()
        first, second = kv[:, 0, ..., :half], kv[:, 0, ..., half : 2 * half]
        rotated_first, rotated_second = rotate_halves(first, second, cos, sin)
        first.copy_(rotated_first)
        second.copy_(rotated_second)
        return kv

    def encode(self, kv: torch.Tensor, positions: torch.Tensor | None = None) -> np.ndarray:
        """Codes for kv (layers, 2, heads, tokens, D): uint8 array (layers, 2, heads, tokens, M).
        ``positions`` (layers, heads, tokens): the memory's token positions, needed when the
        codebook has ``key_rope``."""
        layers, _, heads, tokens, dim = kv.shape
        self.check_shape(layers, heads, dim)
        with torch.inference_mode():
            x = self._move_keys(kv.detach().to("cpu", torch.float32, copy=True), positions, -1)
            x = x - self.mean[:, :, :, None, :]
            y = torch.bmm(self._group_view(x), self.rotation)  # (G, N, D)
            if self.residual:
                codes = _assign_residual(y, self.centroids.unflatten(1, (self.subvectors, CENTROIDS)))
            else:
                codes = _assign(y, self.centroids, self.sizes, self._encode_table())  # (G, N, M)
            codes = self._ungroup(codes, layers, heads, tokens)
        return codes.to(torch.uint8).contiguous().numpy()

    def decode(self, codes: np.ndarray | torch.Tensor, positions: torch.Tensor | None = None, dtype=torch.float32,
               device="cpu") -> torch.Tensor:
        """Reconstruct kv (layers, 2, heads, tokens, D) from codes (layers, 2, heads, tokens, M);
        ``positions`` as for :meth:`encode`."""
        codes = torch.from_numpy(np.array(codes, np.uint8)) if isinstance(codes, np.ndarray) else codes
        layers, _, heads, tokens, m = codes.shape
        if m != self.subvectors:
            raise CodebookError(f"codes have {m} bytes per vector, codebook v{self.version} has {self.subvectors}")
        self.check_shape(layers, heads, self.head_dim)
        with torch.inference_mode():
            g = self._group_view(codes.long())  # (G, N, M)
            groups, n, m = g.shape
            first_row = (torch.arange(groups)[:, None, None] * m + torch.arange(m)) * CENTROIDS
            x = torch.nn.functional.embedding_bag((g + first_row).reshape(-1, m), self._decode_table(), mode="sum")
            x = self._ungroup(x.reshape(groups, n, -1), layers, heads, tokens) + self.mean[:, :, :, None, :]
            x = self._move_keys(x, positions, +1)
        return x.to(device=device, dtype=dtype)

    # ---- serialization -----------------------------------------------------------------------
    def _body(self) -> bytes:
        """The serialized codebook without checksum, in the lowest format that holds it."""
        fmt = canonical_format(self.quantizer, 0 if self.key_rope is None else self.key_rope.numel())
        header = CodebookHeader(fmt, int(self.version), self.fingerprint, self.layers, self.kv_heads, self.head_dim,
                                self.subvectors, self.share, self.quantizer,
                                0 if self.key_rope is None else self.key_rope.numel())
        rope = None if self.key_rope is None else self.key_rope.numpy()
        return pack_codebook(header, CodebookArrays(rope, self.mean.numpy(), self.rotation.numpy(), self.centroids.numpy()))

    def to_bytes(self) -> bytes:
        """Self-describing blob (magic, format version, codebook version, shape, arrays, CRC32)."""
        return with_checksum(self._body())

    @classmethod
    def from_bytes(cls, blob: bytes) -> "PQCodebook":
        header, arrays = read_codebook(blob)
        rope = None if arrays.key_rope is None else torch.from_numpy(arrays.key_rope)
        return cls(header.version, header.fingerprint, torch.from_numpy(arrays.mean), torch.from_numpy(arrays.rotation),
                   torch.from_numpy(arrays.centroids), header.subvectors, header.share, rope, header.quantizer)


# ---- k-means / OPQ internals --------------------------------------------------------------------


def _padded(y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """(N, D) -> (M, N, dmax): subvectors side by side, zero padded (zeros do not change distances)."""
    dmax = max(sizes)
    out = y.new_zeros(len(sizes), y.shape[0], dmax)
    off = 0
    for m, d in enumerate(sizes):
        out[m, :, :d] = y[:, off : off + d]
        off += d
    return out


def _assign(y: torch.Tensor, centroids: torch.Tensor, sizes: tuple[int, ...], padded=None) -> torch.Tensor:
    """Nearest centroid per subvector: y (G, N, D), centroids (G, K, D) -> codes (G, N, M) int64."""
    out = []
    for g in range(y.shape[0]):
        xs = _padded(y[g], sizes)  # (M, N, dmax)
        cs = _padded(centroids[g], sizes) if padded is None else padded[g]  # (M, K, dmax)
        dist = torch.baddbmm((cs * cs).sum(-1)[:, None, :], xs, cs.transpose(1, 2), alpha=-2)  # (M, N, K)
        out.append(dist.argmin(-1).T)
    return torch.stack(out)


def _assign_residual(y: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
    """Greedy residual coding: y (G, N, D), stage centroids (G, M, K, D) -> codes (G, N, M) int64.

    Stage m picks the centroid nearest to what stages 0..m-1 left of the vector.
    """
    residual = y.clone()
    codes = []
    for m in range(stages.shape[1]):
        cents = stages[:, m]  # (G, K, D)
        dist = torch.baddbmm((cents * cents).sum(-1)[:, None, :], residual, cents.transpose(1, 2), alpha=-2)
        code = dist.argmin(-1)  # (G, N)
        residual -= torch.gather(cents, 1, code[:, :, None].expand(-1, -1, y.shape[-1]))
        codes.append(code)
    return torch.stack(codes, -1)


def _train_residual(x: torch.Tensor, stages: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Residual codebooks for one group: x (N, D) -> (stages * K, D), each stage k-means on what
    the stages before it left."""
    residual, books = x.clone(), []
    for _ in range(stages):
        cents = _kmeans(residual[None], iters, gen)[0]  # (K, D)
        residual -= cents[_assign_residual(residual[None], cents[None, None])[0, :, 0]]
        books.append(cents)
    return torch.cat(books)


def _column_map(sizes: tuple[int, ...]) -> torch.Tensor:
    dmax = max(sizes)
    return torch.tensor([m * dmax + j for m, d in enumerate(sizes) for j in range(d)])


def _reconstruct(codes: torch.Tensor, centroids: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """codes (G, N, M) -> rotated-space vectors (G, N, D) with one gather."""
    groups, n, m = codes.shape
    dmax = max(sizes)
    table = torch.stack([_padded(centroids[g], sizes) for g in range(groups)])  # (G, M, K, dmax)
    flat = table.reshape(groups * m * CENTROIDS, dmax)
    index = (torch.arange(groups)[:, None, None] * m + torch.arange(m)[None, None, :]) * CENTROIDS + codes
    rows = flat[index.reshape(-1)].reshape(groups, n, m * dmax)
    return rows[:, :, _column_map(sizes)]


def _kmeans(xs: torch.Tensor, iters: int, gen: torch.Generator, init: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd's k-means for M subspaces at once: xs (M, N, dmax) -> centroids (M, K, dmax).

    Empty clusters are re-seeded with random training points so no code is wasted.
    """
    m, n, dmax = xs.shape
    if init is None:
        pick = torch.randint(0, n, (m, CENTROIDS), generator=gen) if n < CENTROIDS else torch.stack(
            [torch.randperm(n, generator=gen)[:CENTROIDS] for _ in range(m)]
        )
        cents = torch.gather(xs, 1, pick[:, :, None].expand(m, CENTROIDS, dmax)).clone()
    else:
        cents = init.clone()
    offsets = (torch.arange(m) * CENTROIDS)[:, None]
    flat_x = xs.reshape(m * n, dmax)
    for _ in range(iters):
        dist = torch.baddbmm((cents * cents).sum(-1)[:, None, :], xs, cents.transpose(1, 2), alpha=-2)
        flat = (dist.argmin(-1) + offsets).reshape(-1)
        sums = torch.zeros(m * CENTROIDS, dmax).index_add_(0, flat, flat_x)
        counts = torch.bincount(flat, minlength=m * CENTROIDS).float()
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():
            idx = torch.randint(0, n, (int(empty.sum()),), generator=gen)
            sub = empty.nonzero().squeeze(1) // CENTROIDS
            new[empty] = flat_x[sub * n + idx]
        cents = new.reshape(m, CENTROIDS, dmax)
    return cents


def _eigen_allocation(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """OPQ-NP initial rotation: PCA directions dealt to subspaces balancing their log-variance."""
    cov = x.T @ x / max(1, x.shape[0])
    evals, evecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(evals, descending=True)
    buckets: list[list[int]] = [[] for _ in sizes]
    logsum = [0.0] * len(sizes)
    for i in order.tolist():
        open_ = [m for m in range(len(sizes)) if len(buckets[m]) < sizes[m]]
        m = min(open_, key=lambda b: logsum[b])
        buckets[m].append(i)
        logsum[m] += float(torch.log(evals[i].clamp_min(1e-12)))
    cols = [i for b in buckets for i in b]
    return evecs[:, cols].float()


def train_codebook(
    memories: list[ExplicitMemory],
    bytes_per_vector: int = 14,
    version: int = 1,
    *,
    share: str = "layer",
    kmeans_iters: int = 10,
    opq_iters: int = 0,
    seed: int = 0,
    key_rope: torch.Tensor | None = None,
    quantizer: str = "product",
) -> PQCodebook:
    """Train an OPQ codebook on a sample of a bank's memories.

    ``bytes_per_vector`` is the number of 8-bit subquantizers per vector: 14 is the paper's
    setting for 80-d vectors; fewer bytes, smaller memories (docs/experiments.md, "Codec storage").
    All memories must share one fingerprint and one shape. Aim for at least ~10 training vectors
    per centroid in each group (with ``share="layer"``: ``len(memories) * heads * tokens >= 2560``);
    fewer still trains, with centroids repeated, but fidelity on unseen memories drops.
    ``key_rope`` (the memory layers' RoPE angles, :meth:`~memory3.sdk.model.positions.ModelGeometry.codebook_angles`): code keys
    without their position (step 4 of the module docstring); recommended for RoPE models.
    ``quantizer``: ``"product"`` (the paper's) or ``"residual"`` (step 5: closer at the same bytes,
    wants a larger sample -- hundreds of memories, not tens); ``opq_iters`` applies to product only.
    """
    if not memories:
        raise ValueError("train_codebook needs at least one memory")
    if share not in SHARE_MODES:
        raise ValueError(f"share must be one of {SHARE_MODES}, got {share!r}")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    fingerprint = memories[0].fingerprint
    shape = tuple(memories[0].kv.shape)
    for mem in memories:
        if mem.fingerprint != fingerprint:
            raise ValueError("memories for one codebook must come from one model (fingerprints differ)")
        if tuple(mem.kv.shape) != shape:
            raise ValueError(f"memories for one codebook must share a shape: {tuple(mem.kv.shape)} vs {shape}")
    layers, _, heads, _, dim = shape
    sizes = subvector_sizes(dim, bytes_per_vector)
    gen = torch.Generator().manual_seed(seed)
    rope = key_rope
    with torch.inference_mode():
        groups = layers * 2 if share == "layer" else 2
        stages = bytes_per_vector if quantizer == "residual" else 1
        proto = PQCodebook(version, fingerprint, torch.zeros(layers, 2, heads, dim), torch.eye(dim).repeat(groups, 1, 1),
                           torch.zeros(groups, stages * CENTROIDS, dim), bytes_per_vector, share, rope, quantizer)
        kv = torch.cat([proto._move_keys(m.kv.detach().to("cpu", torch.float32, copy=True), m.positions, -1)
                        for m in memories], dim=3)  # tokens stacked
        mean = kv.mean(dim=3)  # (L, 2, H, D)
        x = proto._group_view(kv - mean[:, :, :, None, :])  # (G, N, D)
        rotations, cents = [], []
        for g in range(x.shape[0]):
            xg = x[g]
            if quantizer == "residual":  # full-dimension k-means does not depend on a rotation
                rotations.append(torch.eye(dim))
                cents.append(_train_residual(xg, bytes_per_vector, kmeans_iters, gen))
                continue
            rot = _eigen_allocation(xg, sizes)
            c = None
            for it in range(opq_iters + 1):
                y = xg @ rot
                c = _kmeans(_padded(y, sizes), kmeans_iters if it == 0 else max(2, kmeans_iters // 3), gen, c)
                if it == opq_iters:
                    break
                cent_full = _unpad(c, sizes)  # (K, D)
                codes = _assign(y[None], cent_full[None], sizes)
                y_hat = _reconstruct(codes, cent_full[None], sizes)[0]
                u, _, vh = torch.linalg.svd(xg.T.double() @ y_hat.double())
                rot = (u @ vh).float()  # Procrustes: argmin_R ||x R - y_hat|| over orthogonal R
            rotations.append(rot)
            cents.append(_unpad(c, sizes))
    return PQCodebook(version, fingerprint, mean, torch.stack(rotations), torch.stack(cents), bytes_per_vector, share,
                      rope, quantizer)


def _unpad(c: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """(M, K, dmax) -> (K, D)."""
    return torch.cat([c[m, :, :d] for m, d in enumerate(sizes)], dim=1)
