"""Package a finished `memory3 train` run as the repository's shipped reference model.

A new user should reach a model that answers from memory without first training for 45 minutes.
This copies RUN_DIR/model (weights, tokenizer, memory spec) to OUT_DIR and writes beside it what
makes it usable and checkable: ``references.jsonl`` (every reference of the run's world, the lines
`memory3 ingest --model` reads), ``questions.jsonl`` (the held-out questions, answerable only from
those references, each naming its reference), and ``provenance.json`` (the training command and
config, the commit shipped from, the run's figures, the model fingerprint and the weights' SHA-256),
which ``tests/test_shipped_model.py`` checks the shipped files against.

Usage: python scripts/ship_reference_model.py RUN_DIR OUT_DIR [--command "memory3 train tiny ..."]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.trainer.corpus import HELDOUT, build_world
from memory3.trainer.evaluate import load_run_config
from memory3.trainer.model import load_reference_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--command", default="memory3 train tiny --out-dir runs/reference-tiny",
                        help="the command that produced RUN_DIR (recorded in provenance.json)")
    args = parser.parse_args(argv)
    run, out = Path(args.run_dir), Path(args.out_dir)
    config = load_run_config(run)
    result = json.loads((run / "result.json").read_text())
    if not result.get("finished"):
        raise SystemExit(f"{run}: the run has not finished (result.json: finished is not true)")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run / "model", out)
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    with (out / "references.jsonl").open("w") as f:
        for ref in world.references:
            f.write(json.dumps({"id": f"e{ref.entity_id}", "text": ref.text, "metadata": {"split": ref.split}}) + "\n")
    with (out / "questions.jsonl").open("w") as f:
        for pair in world.qa(HELDOUT):
            f.write(json.dumps({"question": pair.question, "answer": pair.answer,
                                "reference": f"e{pair.entity_id}"}) + "\n")
    model, _, _ = load_reference_model(out)
    report = run / "reference_model.json"
    provenance = {
        "command": args.command,
        "shipped_from_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "config": json.loads((run / "config.json").read_text()),
        "result": {k: v for k, v in result.items() if k != "history"},
        "evaluation": json.loads(report.read_text())["evaluations"] if report.exists() else None,
        "model_fingerprint": model_fingerprint(model),
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"shipped {run} to {out}: {len(world.references)} references, {len(world.qa(HELDOUT))} held-out questions")


if __name__ == "__main__":
    main()
