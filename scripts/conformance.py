"""Print the conformance table: every model-zoo family × dtype × attention implementation → exact or refused.

For each case a memory of every token of 8 random tokens, in every attention layer, is read by the
injector before 7 context tokens, and compared with the same tokens as a prefix at the positions the
memory stands for (0..7, then the context from 128, the default reference length): the largest logit
difference, beside the memory's whole effect (the largest logit change the prefix makes). A refused
case shows the reason memory3 gives. The same measurement runs against an older checkout (put its
package first on PYTHONPATH) to show what changed; the table in docs/conformance.md was made so.

Usage: python scripts/conformance.py [--families a,b] [--dtypes float32,bfloat16] > table.md
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_zoo import FAMILIES, NOTES, supports, tiny_model  # noqa: E402

from memory3.sdk.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.sdk.memory.injection import MemoryInjector  # noqa: E402

try:
    from memory3.sdk.model.positions import memory_spec_for
except ImportError:  # a checkout before per-layer positions: the spec came from config names
    from memory3.core.memory_spec import MemorySpec

    def memory_spec_for(model, layers, tokens_per_head, reference_length):
        return MemorySpec.for_model_config(model.config, layers, tokens_per_head, reference_length)

REFERENCE, CONTEXT, REFERENCE_LENGTH = 8, 7, 128


class _NoTokenizer:
    """Stands in where an older encoder insists on a tokenizer; only token ids are encoded here."""

    bos_token_id = pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": []}


def measure(model) -> tuple[float, float]:
    """(largest |logit| difference memory vs prefix, largest |logit| change the prefix makes)."""
    layers = tuple(range(model.config.num_hidden_layers))
    spec = memory_spec_for(model, layers, tokens_per_head=REFERENCE, reference_length=REFERENCE_LENGTH)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(1)
    reference = torch.randint(3, vocab, (2, REFERENCE), generator=generator)
    context = torch.randint(3, vocab, (2, CONTEXT), generator=generator)
    memories = MemoryEncoder(model, _NoTokenizer(), spec).encode_ids(reference, prefix_length=0)
    with torch.inference_mode():
        plain = model(input_ids=context).logits.double()
        positions = torch.cat((torch.arange(REFERENCE), torch.arange(CONTEXT) + REFERENCE_LENGTH)).expand(2, -1)
        whole = torch.cat((reference, context), 1)  # with a mask, the position jump is not read as packing
        prefix = model(input_ids=whole, position_ids=positions,
                       attention_mask=torch.ones_like(whole)).logits.double()[:, REFERENCE:]
        with MemoryInjector(model, spec) as injector:
            injector.set_memories([[m] for m in memories])
            read = model(input_ids=context).logits.double()
    return float((read - prefix).abs().max()), float((prefix - plain).abs().max())


def cell(family: str, dtype: torch.dtype, impl: str) -> str:
    if not supports(family, impl):
        return "—"
    try:
        error, effect = measure(tiny_model(family, dtype, impl))
    except ValueError as refusal:  # UnsupportedModelError is a ValueError
        return f"refused: {refusal}"
    return f"{error:.1e} of {effect:.2g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    columns = [(dtype, impl) for dtype in dtypes for impl in ("sdpa", "eager")]
    print("| family | " + " | ".join(f"{str(d)[6:]} {i}" for d, i in columns) + " | what it covers |")
    print("|---" * (len(columns) + 2) + "|")
    for family in args.families.split(","):
        cells = [cell(family, dtype, impl).replace("|", "/") for dtype, impl in columns]
        print(f"| {family} | " + " | ".join(cells) + f" | {NOTES.get(family, '')} |", flush=True)


if __name__ == "__main__":
    main()
