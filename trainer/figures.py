"""What every saved figure says about itself: what was measured, on which model and machine, when.

A plot copied into a slide or an issue loses the README around it. :func:`caption` writes one grey
line at the bottom of a figure — the model, the machine (CPU model and cores, or the GPU), the date
it was drawn and the memory3 version — so each PNG in ``bench/results`` and each run directory stands alone.
:func:`machine` is the one description of the hardware used in every caption.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def machine() -> str:
    """This machine in a few words: the GPU if torch sees one, else the CPU model and its cores."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a dependency of every caller
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def caption(fig, model: str, hardware: str | None = None) -> None:
    """One grey line at the bottom of ``fig``: model · hardware · date · memory3 version."""
    try:
        version = metadata.version("memory3")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        version = "source"
    text = f"{model} · {hardware or machine()} · drawn {datetime.date.today().isoformat()} · memory3 {version}"
    fig.text(0.01, 0.005, text, fontsize=7, color="0.4", ha="left", va="bottom")
    fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, 0.16))
