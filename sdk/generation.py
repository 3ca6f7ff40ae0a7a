"""Decoding with explicit memory, the two baselines (plain, RAG), and the proxy: one loop, one API.

This is where the Memory³ half and the Proxy-RLHF half meet. :func:`generate` takes its options
in three groups: :class:`DecodingOptions` (how tokens are chosen), :class:`MemoryOptions` (memory
and RAG modes: bank, supply, top-k, when memories switch) and :class:`ProxyOptions` (an optional
proxy policy on every step, its episodes logged). The memory schedule is Memory³'s: every
``chunk`` tokens (64) of prompt and output read the ``top_k`` memories retrieved with that chunk's
text, each retrieval overlapping one forward step; a memory affects only what is computed while it
is set. All modes share one hand-written loop, so speed comparisons measure the modes, not loops.
A bank in the model's retrieval space is queried with vectors the supply's retrieval head makes
from the chunk's own input embeddings (on the model's device; no text embedder on this path).
Schedule, segments and proxy semantics in detail: docs/design.md ("Reading memories").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from memory3.core.episodes import Episode
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.memory.supply import MemorySupply, Retrieved
from memory3.sdk.model.sampling import SamplingConfig, evaluating, left_pad, nucleus_distribution
from memory3.sdk.proxy.policy import ProxyPolicy
from memory3.sdk.proxy.sampling import make_episodes, make_proxy_chooser

MODES = ("memory", "plain", "rag")


@dataclass
class Segment:
    """Sequence positions ``[start, end)`` of one row computed with one set of memories."""

    start: int
    end: int
    query: str | list[float] | None  # the query text, or its vector in a model-space bank
    reference_ids: list[str]


@dataclass
class GenerationResult:
    """One sequence's output. ``prompt_ids`` are the tokens fed before generation (RAG: with the references)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    segments: list[Segment] = field(default_factory=list)
    rag_reference_ids: list[str] = field(default_factory=list)
    scores: torch.Tensor | None = None  # (generated tokens, vocab) float32 logits, if asked
    episode: Episode | None = None  # with a proxy: its decisions on this row

    @property
    def reference_ids(self) -> list[str]:
        """Every reference used, first use first."""
        seen = dict.fromkeys(self.rag_reference_ids)
        for segment in self.segments:
            seen.update(dict.fromkeys(segment.reference_ids))
        return list(seen)


@dataclass
class TextPiece:
    """A streamed piece of one row's text, with the references in use when it was generated."""

    row: int
    text: str
    reference_ids: list[str]


class _Run:
    """One generate call: a left-padded batch, its KV cache, and (memory mode) its schedule."""

    def __init__(self, model, tokenizer, prompt_ids: list[list[int]], options: DecodingOptions,
                 memory: MemoryOptions | None, proxy: ProxyOptions | None, injector, prefetched: list | None = None):
        """``memory`` and ``injector`` only in memory mode (RAG has placed its texts in the prompts)."""
        self.model, self.tokenizer, self.options, self.proxy = model, tokenizer, options, proxy
        self.supply, self.bank = (memory.supply, memory.bank) if memory is not None else (None, None)
        self.top_k, self.lag = (memory.top_k, memory.lag) if memory is not None else (0, 0)
        self.injector = injector
        self.prefetched = prefetched
        self.prompt_ids = prompt_ids
        self.device = next(model.parameters()).device
        self.batch = len(prompt_ids)
        self.lengths = [len(p) for p in prompt_ids]
        if min(self.lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        width = max(self.lengths)
        self.offsets = [width - n for n in self.lengths]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.pad_id = pad
        self.input_ids, self.mask = left_pad(prompt_ids, pad, self.device)
        self.cache = DynamicCache()
        self.generated: list[list[int]] = [[] for _ in prompt_ids]
        self.finished = [False] * self.batch
        self.segments: list[list[Segment]] = [[] for _ in prompt_ids]
        self.current_ids: list[list[str]] = [[] for _ in prompt_ids]
        self.scores: list[list[torch.Tensor]] = [[] for _ in prompt_ids]
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None and options.stop_at_eos else set()
        self.generator = None
        if options.temperature > 0:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(options.seed if options.seed is not None else 0)
        self.chooser = None  # with a proxy: proxy_sampling's per-step accept/reject procedure
        self.hidden = None  # (batch, hidden) last hidden state of the last fed column, for the proxy
        if proxy is not None:
            if options.temperature <= 0:
                raise ValueError("a proxy samples: pass temperature > 0 (and top_p) with proxy=")
            config = SamplingConfig(options.max_new_tokens, options.temperature, options.top_p, proxy.max_rejections,
                                    proxy.stochastic)
            self.chooser = make_proxy_chooser(model, proxy.policy, config, self.batch, seed=options.seed,
                                              generator=self.generator)

    # ---------------------------------------------------------------- model
    def forward(self, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Feed columns ``[start, end)`` (of the full padded sequence); logits of the last column."""
        mask = self.mask[:, :end]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]
        need_hidden = self.chooser is not None
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            cache=self.cache, use_cache=True, logits_to_keep=1, output_hidden_states=need_hidden,
        )
        if need_hidden:
            self.hidden = out.hidden_states[-1][:, -1]
        return out.logits[:, -1, :].float()

    def choose(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The tokens of generation step ``step`` (0 = first generated token) from the last logits."""
        options = self.options
        if options.output_scores:
            for b in range(self.batch):
                if not self.finished[b]:
                    self.scores[b].append(logits[b].cpu())
        if options.temperature <= 0:
            tokens = logits.argmax(-1)
        else:
            probs = nucleus_distribution(logits, options.temperature, options.top_p)
            if self.chooser is None:
                tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            else:
                alive = torch.tensor([not f for f in self.finished], dtype=torch.bool, device=logits.device)
                tokens = self.chooser(step, probs, logits, self.hidden, alive)
        for b in range(self.batch):
            if self.finished[b]:
                tokens[b] = self.pad_id
        return tokens

    # ---------------------------------------------------------------- memories
    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def inject(self, rows: list[Retrieved | None], future=None) -> None:
        """Set each row's memories (None: keep what the row has)."""
        t0 = time.perf_counter()
        memories = []
        for b, row in enumerate(rows):
            if row is not None:
                self._memories[b] = row.memories
                self._memory_scores[b] = row.memory_scores
                self.current_ids[b] = list(row.memory_ids)
            memories.append(self._memories[b])
        self.injector.set_memories(memories, self._memory_scores)
        if future is not None:
            future.timing.inject += time.perf_counter() - t0

    def collect(self, future) -> list[Retrieved]:
        t0 = time.perf_counter()
        result = future.result()
        future.timing.wait += time.perf_counter() - t0
        return result

    # ---------------------------------------------------------------- schedule
    def prefill(self) -> torch.Tensor:
        width = self.input_ids.shape[1]
        chunked = self.supply is not None or self.options.chunked_prefill
        if not chunked:
            return self.forward(self.input_ids, 0, width)
        chunk, top_k = self.options.chunk, self.top_k
        cuts = {0, width}
        for b, n in enumerate(self.lengths):
            cuts.update(self.offsets[b] + c * chunk for c in range((n + chunk - 1) // chunk))
        cuts = sorted(cuts)
        if self.supply is None:  # a baseline computing the very same forwards, without memory
            for start, end in zip(cuts[:-1], cuts[1:]):
                logits = self.forward(self.input_ids[:, start:end], start, end)
            return logits
        self._memories: list[list] = [[] for _ in range(self.batch)]
        self._memory_scores: list[list[float]] = [[] for _ in range(self.batch)]
        futures = self.prefetched or submit_prompt_queries(self.tokenizer, self.supply, self.bank, self.prompt_ids, chunk, top_k)
        results: dict[int, list[Retrieved]] = {}
        logits = None
        for start, end in zip(cuts[:-1], cuts[1:]):
            rows: list[Retrieved | None] = []
            newest = None  # the request whose memories start in this piece (gets the inject time)
            for b in range(self.batch):
                local = start - self.offsets[b]
                if local < 0:
                    rows.append(Retrieved(None))  # still padding: no memories
                    continue
                c = local // chunk
                if c not in results:
                    results[c] = self.collect(futures[c])
                rows.append(results[c][b] if local % chunk == 0 else None)
                if local % chunk == 0:
                    newest = futures[c]
                    self.segments[b].append(
                        Segment(local, min(local + chunk, self.lengths[b]), results[c][b].query, list(results[c][b].memory_ids))
                    )
            self.inject(rows, newest)
            logits = self.forward(self.input_ids[:, start:end], start, end)
        for b in range(self.batch):  # the first generated chunk keeps the last prompt chunk's memories
            last = self.segments[b][-1]
            self.segments[b].append(Segment(self.lengths[b], self.lengths[b], last.query, list(last.reference_ids)))
        return logits

    def run(self) -> Iterator[torch.Tensor]:
        """Yield the sampled tokens (batch,) of each step."""
        options, chunk, lag = self.options, self.options.chunk, self.lag
        logits = self.prefill()
        pending = None
        for n in range(1, options.max_new_tokens + 1):  # n: tokens sampled so far, after this one
            tokens = self.choose(logits, n - 1)
            for b in range(self.batch):
                if not self.finished[b]:
                    self.generated[b].append(int(tokens[b]))
                    if int(tokens[b]) in self.eos:
                        self.finished[b] = True
            yield tokens
            if n == options.max_new_tokens or all(self.finished):
                break
            if self.supply is not None:
                if n % chunk == 0 and n + lag + 1 < options.max_new_tokens:  # query: the last `chunk` tokens
                    chunks = [None if self.finished[b] else g[n - chunk : n] for b, g in enumerate(self.generated)]
                    pending = self.supply.request(self.bank, chunk_queries(self.tokenizer, self.supply, self.bank, chunks),
                                                  self.top_k)
                if (n - 1 - lag) % chunk == 0 and n - 1 - lag >= chunk:  # first token of a new chunk (+ lag): switch
                    rows = self.collect(pending)
                    self.inject(rows, pending)
                    for b, row in enumerate(rows):
                        self.segments[b].append(Segment(self.lengths[b] + n - 1, self.lengths[b] + n - 1, row.query, list(row.memory_ids)))
                for b in range(self.batch):
                    if not self.finished[b]:
                        self.segments[b][-1].end = self.lengths[b] + n  # g_n is fed at position length + n - 1
            width = self.mask.shape[1]
            self.mask = torch.cat((self.mask, torch.ones((self.batch, 1), dtype=self.mask.dtype, device=self.device)), dim=1)
            logits = self.forward(tokens[:, None].to(self.device), width, width + 1)


def _tokenize(tokenizer, prompts) -> list[list[int]]:
    """Prompts as token ids: strings are tokenized with the tokenizer's defaults, id lists kept."""
    if isinstance(prompts, str):
        raise TypeError("prompts is a list of prompts; wrap a single prompt in a list")
    return [list(p) if not isinstance(p, str) else tokenizer(p)["input_ids"] for p in prompts]


def chunk_queries(tokenizer, supply: MemorySupply, bank: str, chunks: Sequence[Sequence[int] | None]) -> list:
    """Each row's query for a chunk of token ids (None: no query): its text, or for a bank in the
    model's retrieval space its vector from the model's own input embeddings (special tokens left out)."""
    if supply.model_space(bank):
        return supply.query_vectors(chunks, tokenizer.all_special_ids)
    return [tokenizer.decode(list(ids), skip_special_tokens=True) if ids is not None else None for ids in chunks]


def submit_prompt_queries(tokenizer, supply: MemorySupply, bank: str, prompt_ids, chunk: int, top_k: int) -> list:
    """Submit the retrieval of every prompt chunk's memories; one future per chunk index (all rows)."""
    n_chunks = max((len(p) + chunk - 1) // chunk for p in prompt_ids)
    futures = []
    for c in range(n_chunks):
        chunks = [p[c * chunk : (c + 1) * chunk] if c * chunk < len(p) else None for p in prompt_ids]
        futures.append(supply.request(bank, chunk_queries(tokenizer, supply, bank, chunks), top_k))
    return futures


@dataclass
class Prefetch:
    """Prompt retrievals started ahead of :func:`generate` (e.g. for the next batch while this one decodes).

    Pass it as ``generate(..., prefetch=handle)`` with the same prompts, chunk and top_k.
    """

    bank: str
    prompt_ids: list[list[int]]
    chunk: int
    top_k: int
    futures: list


def prefetch(tokenizer, supply: MemorySupply, bank: str, prompts, chunk: int = 64, top_k: int = 5) -> Prefetch:
    """Start retrieving the memories of every prompt chunk now; returns at once."""
    prompt_ids = _tokenize(tokenizer, prompts)
    return Prefetch(bank, prompt_ids, chunk, top_k, submit_prompt_queries(tokenizer, supply, bank, prompt_ids, chunk, top_k))


def _rag_prompts(tokenizer, supply, bank, prompts, prompt_ids, top_k) -> tuple[list[list[int]], list[list[str]]]:
    """RAG baseline: top-k reference texts retrieved once with the prompt, placed before it (a
    model-space bank: retrieved with the prompt's vector)."""
    if supply.model_space(bank):
        queries = supply.query_vectors(prompt_ids, tokenizer.all_special_ids)
    else:
        queries = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    answers = supply.request_references(bank, queries, top_k).result()
    out_ids, out_refs = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    for ids, refs in zip(prompt_ids, answers):
        context = "".join(r.text + "\n\n" for r in refs)
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        if bos is not None and ids and ids[0] == bos:  # keep BOS first
            out_ids.append([bos] + context_ids + list(ids[1:]))
        else:
            out_ids.append(context_ids + list(ids))
        out_refs.append([r.external_id for r in refs])
    return out_ids, out_refs


@dataclass
class DecodingOptions:
    """How tokens are chosen (every mode)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; > 0: sample from the top-p nucleus with a seeded generator
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    output_scores: bool = False  # keep each step's logits in GenerationResult.scores
    chunk: int = 64  # tokens per memory segment (memory mode) and per prefill piece (chunked_prefill)
    chunked_prefill: bool = False  # plain/RAG: prefill in memory-mode pieces (bit-identical to memory mode without memories)


@dataclass
class MemoryOptions:
    """Where memories come from and when they switch (memory and RAG modes)."""

    supply: MemorySupply
    bank: str
    top_k: int = 5  # memories per chunk (RAG: reference texts before the prompt)
    lag: int = 0  # switch a generated chunk's memories this many tokens after its boundary (0: the paper's schedule)
    retrieval_bias: float = 0.0  # the injector's retrieval prior (memory3.sdk.memory.injection); 0: off
    prefetch: Prefetch | None = None  # prompt retrievals started ahead with :func:`prefetch`


@dataclass
class ProxyOptions:
    """Stable proxy sampling on every step (needs temperature > 0); a proxy of another model is refused."""

    policy: ProxyPolicy
    max_rejections: int = 4
    stochastic: bool = True  # accept ~ Bernoulli(p); False: accept iff p >= 0.5
    reward: object | None = None  # a memory3.sdk.proxy.reward.Reward: scores each episode at the end
    trajectory_logger: object | None = None  # a memory3.sdk.proxy.logger.TrajectoryLogger: queues each episode


def _prepare(model, tokenizer, prompts, mode: str, memory: MemoryOptions | None, decoding: DecodingOptions,
             proxy: ProxyOptions | None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "plain" and memory is None:
        raise ValueError(f"mode {mode!r} needs MemoryOptions (a MemorySupply and a bank)")
    top_k, lag = (memory.top_k, memory.lag) if memory is not None else (0, 0)
    if decoding.chunk <= 0 or top_k < 0 or decoding.max_new_tokens <= 0 or lag < 0:
        raise ValueError("chunk and max_new_tokens must be positive, top_k and lag >= 0")
    prompt_ids = _tokenize(tokenizer, prompts)
    rag_refs: list[list[str]] = [[] for _ in prompt_ids]
    if mode == "rag":
        prompt_ids, rag_refs = _rag_prompts(tokenizer, memory.supply, memory.bank, prompts, prompt_ids, top_k)
    if mode != "memory":
        return _Run(model, tokenizer, prompt_ids, decoding, None, proxy, None), contextlib.nullcontext(), rag_refs
    futures = None
    if memory.prefetch is not None:
        ahead = memory.prefetch
        if (ahead.bank, ahead.prompt_ids, ahead.chunk, ahead.top_k) != (memory.bank, prompt_ids, decoding.chunk, top_k):
            raise ValueError("prefetch was started for other prompts, bank, chunk or top_k")
        futures = ahead.futures
    injector = MemoryInjector(model, memory.supply.spec, retrieval_bias=memory.retrieval_bias)
    run = _Run(model, tokenizer, prompt_ids, decoding, memory, proxy, injector, futures)
    return run, injector, rag_refs


def _results(run: _Run, rag_refs, bank: str | None = None) -> list[GenerationResult]:
    episodes: list[Episode | None] = [None] * run.batch
    if run.chooser is not None:
        proxy = run.proxy
        episodes = make_episodes(run.model, proxy.policy, run.prompt_ids, run.generated, run.chooser.decisions,
                                 bank or "", proxy.reward, run.tokenizer)
        if proxy.trajectory_logger is not None:
            for episode in episodes:
                proxy.trajectory_logger.log(episode)
    return [
        GenerationResult(
            text=run.text(run.generated[b]), token_ids=run.generated[b], prompt_ids=run.prompt_ids[b],
            segments=[s for s in run.segments[b] if s.end > s.start], rag_reference_ids=rag_refs[b],
            scores=torch.stack(run.scores[b]) if run.scores[b] else None, episode=episodes[b],
        )
        for b in range(run.batch)
    ]


def generate(model, tokenizer, prompts, *, mode: str = "memory", memory: MemoryOptions | None = None,
             decoding: DecodingOptions | None = None, proxy: ProxyOptions | None = None) -> list[GenerationResult]:
    """Generate for a batch of prompts (strings or token id lists) in one of :data:`MODES`.

    ``memory`` is required in memory and RAG modes. With ``proxy``, each result's ``episode``
    records the decisions, the proxy's version and the bank; to follow a registry, pass
    ``ProxyUpdater.policy`` (:mod:`~memory3.sdk.proxy.updates`) per call: a call keeps the proxy
    it started with.
    """
    decoding = decoding or DecodingOptions()
    run, context, rag_refs = _prepare(model, tokenizer, prompts, mode, memory, decoding, proxy)
    policy = proxy.policy if proxy is not None else None
    with torch.inference_mode(), context, (evaluating(policy) if policy is not None else contextlib.nullcontext()):
        for _ in run.run():
            pass
    bank = memory.bank if memory is not None and mode != "plain" else None
    return _results(run, rag_refs, bank)


def stream(model, tokenizer, prompts, *, mode: str = "memory", memory: MemoryOptions | None = None,
           decoding: DecodingOptions | None = None) -> Iterator[TextPiece]:
    """Like :func:`generate`, but yield text pieces per row as tokens arrive.

    Each piece carries the reference ids whose memories were in use (RAG: the references placed
    before the prompt). A piece is held back while the text so far ends in an incomplete
    character (byte-level tokens), so pieces concatenate to the final text. Inference mode is
    entered per step only, never left on while the caller runs.
    """
    with torch.inference_mode():
        run, context, rag_refs = _prepare(model, tokenizer, prompts, mode, memory, decoding or DecodingOptions(), None)
    shown = [""] * run.batch
    with context:
        steps = run.run()
        while True:
            with torch.inference_mode():
                step = next(steps, None)
            if step is None:
                break
            for b in range(run.batch):
                text = run.text(run.generated[b])
                if text.endswith("\ufffd") or len(text) <= len(shown[b]):
                    continue
                piece, shown[b] = text[len(shown[b]) :], text
                yield TextPiece(b, piece, list(rag_refs[b] or run.current_ids[b]))
    for b in range(run.batch):  # whatever was held back
        text = run.text(run.generated[b])
        if len(text) > len(shown[b]):
            yield TextPiece(b, text[len(shown[b]) :], list(rag_refs[b] or run.current_ids[b]))


def generate_with_memory(model, tokenizer, prompts, memory: MemoryOptions, decoding: DecodingOptions | None = None,
                         proxy: ProxyOptions | None = None) -> list[GenerationResult]:
    """Memory-augmented decoding (Memory³'s schedule)."""
    return generate(model, tokenizer, prompts, mode="memory", memory=memory, decoding=decoding, proxy=proxy)


def generate_plain(model, tokenizer, prompts, decoding: DecodingOptions | None = None,
                   proxy: ProxyOptions | None = None) -> list[GenerationResult]:
    """Baseline: the same loop without memory."""
    return generate(model, tokenizer, prompts, mode="plain", decoding=decoding, proxy=proxy)


def generate_rag(model, tokenizer, prompts, memory: MemoryOptions, decoding: DecodingOptions | None = None,
                 proxy: ProxyOptions | None = None) -> list[GenerationResult]:
    """Baseline: top-k reference texts retrieved once with the prompt, placed before it."""
    return generate(model, tokenizer, prompts, mode="rag", memory=memory, decoding=decoding, proxy=proxy)
