"""``memory3 generate``: stream one prompt's text from a saved model, reading a bank's memories.

The text goes to ``out``; the references whose memories are in use go to ``err`` each time they
change, then a list of every reference used, so a user sees what the model read while it wrote.
"""

from __future__ import annotations

import sys

from memory3.sdk.generation import DecodingOptions, MemoryOptions, stream
from memory3.sdk.memory.retrieval_head import load_retrieval_head
from memory3.sdk.memory.supply import MemorySupply
from memory3.sdk.model.adapters import load_adapter
from memory3.trainer.model import load_reference_model


def generate_command(target: str, api_key: str, bank: str, model_dir: str, prompt: str, *, mode: str = "memory",
                     max_new_tokens: int = 128, chunk: int = 64, top_k: int = 5, temperature: float = 0.0,
                     retrieval_bias: float = 0.0, adapter_dir: str | None = None, out=None, err=None) -> None:
    from transformers.utils import logging as transformers_logging

    out, err = out or sys.stdout, err or sys.stderr
    transformers_logging.disable_progress_bar()  # stderr keeps to the references used and one-line errors
    model, tokenizer, spec = load_reference_model(model_dir)
    if adapter_dir:  # the base's banks serve it: an adapted model keeps its base's fingerprint
        model = load_adapter(model, adapter_dir)
    head = load_retrieval_head(model_dir, model)  # for a bank in the model's space, if it has one
    with MemorySupply(target, api_key, model, spec, tokenizer=tokenizer, retrieval_head=head) as supply:
        memory = None if mode == "plain" else MemoryOptions(supply, bank, top_k=top_k, retrieval_bias=retrieval_bias)
        decoding = DecodingOptions(max_new_tokens=max_new_tokens, temperature=temperature, chunk=chunk)
        shown: list[str] | None = None
        used: dict[str, None] = {}
        for piece in stream(model, tokenizer, [prompt], mode=mode, memory=memory, decoding=decoding):
            if piece.reference_ids != shown:
                shown = piece.reference_ids
                used.update(dict.fromkeys(shown))
                out.flush()
                print(f"\n[references: {', '.join(shown) or 'none'}]", file=err, flush=True)
            out.write(piece.text)
            out.flush()
        out.write("\n")
        if used:
            refs = supply.run(supply.client.fetch(bank, list(used), include_memory=False, allow_missing=True))
            print("references used:", file=err)
            for ref in refs:
                print(f"  {ref.external_id}: {ref.text[:100]}", file=err)
