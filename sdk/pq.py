"""Product quantization of memory key/value vectors: the codebook and how to train it.

Why PQ: Memory3 (arXiv 2407.01178) stores each 80-d bf16 key/value vector of an explicit memory
as 14 bytes with OPQ-PQ, 11.4x below bf16, which with sparsity gives the paper's ~365x against
the dense KV of a whole reference. Codebooks are trained per *bank* on a sample of its memories,
stored with the bank as a blob (:meth:`PQCodebook.to_bytes`) and versioned; every PQ memory names
the codebook version (and a digest of its content) that it was encoded with, so a memory is never
decoded with the wrong centroids (see :mod:`memory3.sdk.codec`).

The scheme, per vector ``x`` of memory layer ``l``, K/V slot ``s`` and KV head ``h``:

1. **Centre**: ``x - mean[l, s, h]``. Keys carry strong per-head channel biases; the mean is part
   of the codebook, so it costs nothing per memory.
2. **Rotate** (OPQ): ``y = x_c @ R[g]`` with one orthogonal ``D x D`` matrix per *group* ``g``.
   By default a group is one (memory layer, K/V) pair, i.e. the 8 heads of a layer share
   centroids (``share="layer"``); ``share="kv"`` uses one group for all keys and one for all
   values (fewer training vectors needed, lower fidelity). ``R`` starts from PCA with the
   eigenvalue allocation of OPQ-NP (Ge et al. 2013: balance the product of variances across
   subspaces). ``opq_iters`` Procrustes refinements (parametric OPQ) are optional and off by
   default: on KV-like data they gained < 0.001 cosine for twice the training time.
3. **Split** ``y`` into ``M`` contiguous subvectors (``M = bytes_per_vector``; sizes differ by at
   most one when ``M`` does not divide ``D``) and store, for each, the index of its nearest of
   ``256`` centroids: one byte per subvector, ``M`` bytes per vector.

4. **Keys without their position** (optional, ``key_rope``): a stored key is the post-RoPE key at
   its token's position in the reference, so the same content at two positions is two different
   vectors, and the codebook spends centroids on the rotation. When the codebook carries the
   model's RoPE frequencies, keys are rotated back to position 0 (their stored positions are in
   every memory) before steps 1-3 and rotated forward again after decoding. The rotation is exact
   and orthogonal, so it costs no byte. Measured (bench/bench_codec.py, bench_codec_qa.py): key
   cosine at 9 bytes per 80-d vector 0.883 -> 0.930 (synthetic KV); on the reference model at 0.9
   bits/dim, with codebooks trained on memories the evaluation does not read, held-out answer NLL
   increase 0.673 -> 0.669 nats and top-1 exact-match loss 15.0 -> 17.3 points: no gain there.
   (Codebooks trained on the evaluated bank itself had shown 0.48 -> 0.37 nats.)

5. **Residual quantizer** (optional, ``quantizer="residual"``): instead of splitting ``y`` into
   ``M`` subvectors, code it in ``M`` stages of 256 *full-dimension* centroids each: stage ``m``
   stores the centroid nearest to what stages ``0..m-1`` left (greedy), and decoding sums the
   ``M`` chosen centroids -- the same one-byte-per-code layout and the same gather-and-sum decode,
   so memories and the codec do not change; the codebook names its quantizer (format 3). Why:
   at the ">= 500x" budget (0.9 bits/dim) the product quantizer cannot use the correlation
   between subspaces and loses too much. Measured on memories its codebook never saw
   (bench/bench_codec_qa.py, codebook trained on 2,000 other memories, 0.9 bits/dim): held-out
   top-1 exact-match loss 8.1 vs 17.3 points and answer NLL +0.39 vs +0.67 nats, less than the
   paper's 1.4 bits/dim product setting (9.6 points, +0.53); squared error over the variance
   0.10 vs 0.15 (a probe of the same data); at the Memory3 shape
   (bench/bench_codec.py, synthetic KV, 150 training memories, 9 bytes per 80-d vector) key /
   value cosine 0.993 / 0.992 vs 0.930 / 0.912 and attention-output error 0.13 vs 0.42, better
   than 14-byte product PQ (0.30). Costs: encoding is ``M`` sequential nearest-centroid searches
   in ``D`` dimensions (about 2-3x slower than product PQ), the codebook is ``M`` times larger,
   and training needs more memories (each stage is k-means on the residuals: with fewer than ~10 training vectors per
   centroid the later stages fit the sample, and on 40 memories of the reference model it coded
   unseen memories worse than product PQ). Rotation is the identity (full-dimension k-means does
   not depend on one).
6. **A reader trained on coded memories** (not in this module: a training stage,
   :mod:`memory3.trainer.quantization_aware`): the rest of the QA loss at 1 bit/dim is the model
   reading slightly wrong keys and values it never saw in training; a short continuation of
   stage 2 that reads every memory through a residual codebook shrinks it (figures there). The
   codec and this module do not change for it.

Per-vector norm/scale: **none is stored**. Every stored byte counts against the ~365x / 500x
budgets, and an fp16 norm would cost 2 of the 14 bytes; the per-head mean and the per-group
rotation absorb the systematic scale differences between heads and channels, and the centroids
of each subspace span the magnitudes seen in training. This is the paper's plain (O)PQ.

Training is k-means in torch (no faiss dependency): deterministic for a seed, batched over the
subspaces of a group, CPU-friendly for the sizes a bank sample has (thousands of vectors per
group).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .memory import ExplicitMemory
from .rope import Rotary, rotate_halves

CODEBOOK_MAGIC = b"M3PQ"
CODEBOOK_FORMAT_VERSION = 3
"""2 adds the keys' RoPE frequencies (``key_rope``); 3 adds the quantizer (``residual``). A codebook
is written in the lowest format that holds it (product without RoPE: 1; product with RoPE: 2), so
the digest that stored memories name never changes with the build."""
CENTROIDS = 256
"""Centroids per subquantizer: one byte per code (the paper's and faiss' default)."""
SHARE_MODES = ("layer", "kv")
QUANTIZERS = ("product", "residual")
"""``product``: the paper's (O)PQ, one byte per subvector. ``residual``: one byte per stage, each stage
a full-dimension codebook for what the stages before it left (module docstring, step 5)."""

_HEADER = struct.Struct("<4sHIHHHHBBB")  # magic, fmt, version, layers, heads, head_dim, centroids, M, share, fp_len
_ROPE_LEN = struct.Struct("<H")  # format 2, after the fingerprint: number of RoPE frequencies (>= 1; 3: >= 0)
_QUANTIZER = struct.Struct("<B")  # format 3, after the RoPE length: index into QUANTIZERS


class CodebookError(ValueError):
    """A codebook blob is corrupt, truncated, or does not fit the memories it is used with."""


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
        gather, a column shuffle and a D x D matmul: a memory decodes about 3x faster, for a
        table M times the codebook's size (about 32 MB at the Memory3 shape, 9 bytes per vector).
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
            self._digest = hashlib.sha256(self._body()).digest()[:8]
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
        if (layers, heads, head_dim) != (self.layers, self.kv_heads, self.head_dim):
            raise CodebookError(
                f"codebook v{self.version} is for (layers, kv heads, head dim) "
                f"{(self.layers, self.kv_heads, self.head_dim)}, memory has {(layers, heads, head_dim)}"
            )

    def _move_keys(self, kv: torch.Tensor, positions: torch.Tensor | None, sign: int) -> torch.Tensor:
        """Keys rotated by ``sign * positions`` (to position 0 and back) when the codebook codes
        keys without their position, in place on ``kv`` (a float32 tensor the caller owns); ``kv``
        unchanged otherwise. The rotation is :func:`~memory3.sdk.rope.rotate_halves` (the model's),
        from a cached table of cos/sin per position (computing the angles per call, as
        :meth:`~memory3.sdk.rope.Rotary.rotate` does, halved PQ decode speed)."""
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
        """The serialized codebook without checksum. A codebook without ``key_rope`` is written in
        format 1, byte for byte as before format 2, so its digest (named by stored memories) holds."""
        fp = self.fingerprint.encode("utf-8")
        if len(fp) > 255:
            raise CodebookError("fingerprint longer than 255 bytes")
        fmt = 3 if self.residual else 1 if self.key_rope is None else 2
        head = _HEADER.pack(
            CODEBOOK_MAGIC, fmt, int(self.version), self.layers, self.kv_heads,
            self.head_dim, CENTROIDS, self.subvectors, SHARE_MODES.index(self.share), len(fp),
        ) + fp
        arrays = (self.mean, self.rotation, self.centroids)
        if fmt >= 2:
            head += _ROPE_LEN.pack(0 if self.key_rope is None else self.key_rope.numel())
        if fmt >= 3:
            head += _QUANTIZER.pack(QUANTIZERS.index(self.quantizer))
        if self.key_rope is not None:
            arrays = (self.key_rope,) + arrays
        return head + b"".join(a.numpy().astype("<f4").tobytes() for a in arrays)

    def to_bytes(self) -> bytes:
        """Self-describing blob (magic, format version, codebook version, shape, arrays, CRC32)."""
        body = self._body()
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "PQCodebook":
        blob = bytes(blob)
        if len(blob) < _HEADER.size + 4:
            raise CodebookError(f"truncated codebook: {len(blob)} bytes is shorter than its header")
        (magic, fmt, version, layers, heads, dim, centroids, m, share, fp_len) = _HEADER.unpack_from(blob)
        if magic != CODEBOOK_MAGIC:
            raise CodebookError(f"not a PQ codebook: magic {magic!r}, expected {CODEBOOK_MAGIC!r}")
        if fmt not in range(1, CODEBOOK_FORMAT_VERSION + 1):
            raise CodebookError(f"unsupported codebook format version {fmt} (this build reads 1 to {CODEBOOK_FORMAT_VERSION})")
        if centroids != CENTROIDS or share >= len(SHARE_MODES) or not (layers and heads and dim and 1 <= m <= dim):
            raise CodebookError("corrupt codebook header")
        groups = layers * 2 if SHARE_MODES[share] == "layer" else 2
        rope_len, quantizer = 0, 0
        fields = (_ROPE_LEN.size if fmt >= 2 else 0) + (_QUANTIZER.size if fmt >= 3 else 0)
        if len(blob) < _HEADER.size + fp_len + fields:
            raise CodebookError(f"truncated codebook: {len(blob)} bytes is shorter than its header")
        if fmt >= 2:
            (rope_len,) = _ROPE_LEN.unpack_from(blob, _HEADER.size + fp_len)
            if fmt == 2 and not rope_len:
                raise CodebookError("corrupt codebook header: format 2 without RoPE frequencies")
        if fmt >= 3:
            (quantizer,) = _QUANTIZER.unpack_from(blob, _HEADER.size + fp_len + _ROPE_LEN.size)
            if quantizer >= len(QUANTIZERS):
                raise CodebookError(f"corrupt codebook header: unknown quantizer {quantizer}")
        stages = m if QUANTIZERS[quantizer] == "residual" else 1
        sizes = (rope_len, layers * 2 * heads * dim, groups * dim * dim, groups * stages * CENTROIDS * dim)
        expected = _HEADER.size + fp_len + fields + 4 * sum(sizes) + 4
        if len(blob) != expected:
            raise CodebookError(f"truncated codebook: header says {expected} bytes, got {len(blob)}")
        (stored,) = struct.unpack_from("<I", blob, len(blob) - 4)
        computed = zlib.crc32(memoryview(blob)[:-4])
        if stored != computed:
            raise CodebookError(f"codebook checksum mismatch: stored 0x{stored:08x} computed 0x{computed:08x}")
        off = _HEADER.size
        fingerprint = blob[off : off + fp_len].decode("utf-8")
        off += fp_len + fields
        arrays = []
        for n in sizes:
            arrays.append(torch.from_numpy(np.frombuffer(blob, "<f4", n, off).astype(np.float32)))
            off += 4 * n
        rope = arrays[0] if rope_len else None
        mean = arrays[1].reshape(layers, 2, heads, dim)
        rotation = arrays[2].reshape(groups, dim, dim)
        cents = arrays[3].reshape(groups, stages * CENTROIDS, dim)
        return cls(version, fingerprint, mean, rotation, cents, m, SHARE_MODES[share], rope, QUANTIZERS[quantizer])


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
    key_rope: Rotary | torch.Tensor | None = None,
    quantizer: str = "product",
) -> PQCodebook:
    """Train an OPQ codebook on a sample of a bank's memories.

    ``bytes_per_vector`` is the number of 8-bit subquantizers per vector: 14 is the paper's
    setting for 80-d vectors (~365x against the dense reference KV); 8 gives > 500x.
    All memories must share one fingerprint and one shape. Aim for at least ~10 training vectors
    per centroid in each group (with ``share="layer"``: ``len(memories) * heads * tokens >= 2560``);
    fewer still trains, with centroids repeated, but fidelity on unseen memories drops.
    ``key_rope`` (the model's :class:`~memory3.sdk.rope.Rotary`, or its ``inv_freq``): code keys
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
    rope = key_rope.inv_freq if isinstance(key_rope, Rotary) else key_rope
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
