"""Reference-model report: held-out QA exact match with no memory, RAG and explicit memory,
tokens/s of each (same loop, same batches), model size, corpus size and training time.

    python bench/bench_reference_model.py [RUN_DIR]      # default runs/reference-tiny

Prints the table and writes bench/results/reference_model.{md,json,png}. The run is rebuilt by
``memory3 train tiny --out-dir runs/reference-tiny`` (stages 1 + 2; see trainer/configs/tiny.yaml).
All logic lives in :mod:`memory3.trainer.evaluate`; this file only gives it a bench entry point.
"""

import sys

from memory3.trainer.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
