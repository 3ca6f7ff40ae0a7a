"""The README's Quick tour, "From Python" and shipped-model blocks run as written, against a live server.

The Quick tour's bash block is executed by bash with ``set -e`` in a fresh HOME (so the embedded
PostgreSQL is made from scratch under it, as on a new machine), on a free port instead of 50051 and
any free metrics port (the only changes: tests may run beside a real server), with ``memory3`` and ``python``
of this environment first on PATH; the Python block runs next, against the same server, before the
background server is stopped, and then the block that answers a held-out question with the shipped
model from memory. What the blocks' comments promise is asserted on their output. The
install blocks are what CI itself runs; training and benchmark blocks take minutes to hours and are
run by hand (docs/experiments.md records them), so each of their 40-odd commands is run only up to its
command line's parsing: the program exists, imports, and accepts every flag as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
DEADLINE = 300


def code_block(after_heading: str, language: str, text: str) -> str:
    """The first ``language`` fenced block after the line ``after_heading``."""
    start = text.index(after_heading)
    match = re.search(rf"^```{language}\n(.*?)^```", text[start:], flags=re.S | re.M)
    assert match, f"no {language} block after {after_heading!r}"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quick_tour_and_python_blocks_run_as_written(tmp_path):
    text = README.read_text()
    port = str(free_port())
    tour = code_block("## Quick tour", "bash", text)
    shipped = code_block("A model that answers from memory", "bash", text)
    python = code_block("From Python", "python", text).replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    (tmp_path / "from_python.py").write_text(python)
    (tmp_path / "models").symlink_to(README.parent / "models")  # the shipped model, as from the repository root
    script = ("set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + tour
              + "echo '--- python'\npython from_python.py\n" + "echo '--- shipped'\n" + shipped)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_") and k != "DATABASE_URL"}
    home = tempfile.mkdtemp(prefix="m3-", dir="/tmp")  # short: PostgreSQL's socket path has a length limit
    env.update(HOME=home, MEMORY3_PORT=port, MEMORY3_METRICS_PORT="0",  # 9464 may be taken
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    try:
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=DEADLINE)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    tour_out, rest = result.stdout.split("--- python\n")
    python_out, shipped_out = rest.split("--- shipped\n")
    assert f"memory3 listening on 127.0.0.1:{port}" in result.stdout + result.stderr
    assert "SERVING" in tour_out
    assert 0 <= tour_out.index("t1") < tour_out.index("t2")  # the query lists t1 first, as the comment says
    filtered = [json.loads(line) for line in tour_out.splitlines() if line.startswith('{"id"')]
    assert [hit["id"] for hit in filtered] == ["t1"]  # query --filter --json: only t1, as a JSON line
    assert [line.split()[0] for line in tour_out.splitlines() if line.startswith(("t1 {", "t2 {"))] == ["t1"]  # scroll
    assert python_out.strip().splitlines()[-1] == "['0', '1']"
    assert shipped_out.strip().splitlines()[-2].strip() == "Vamdra"  # the answer, read from memory


class _Accepted(Exception):
    """Raised by the patched ``parse_args`` once a program has accepted its command line."""


def readme_commands(text: str) -> list[str]:
    """Every `memory3 …` and `python path.py …` line of the README's bash blocks, comments removed."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("memory3 ", "python ")) and " -c " not in line and "$(" not in line:
                commands.append(line)
    return commands


def test_every_readme_command_is_accepted_by_its_program(monkeypatch):
    """The README's other blocks (training, adapters, benchmarks, development) take minutes to hours
    to run; each of their commands must still name a program that exists and accept every flag as
    written. Each runs in this process up to its first ``parse_args`` (which then stops it), so
    a renamed flag, a removed script or a broken import fails here."""
    import argparse
    import runpy
    import shlex

    original = argparse.ArgumentParser.parse_args

    def accept(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Accepted

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", accept)
    commands = readme_commands(README.read_text())
    assert len(commands) >= 25, commands
    refused = []
    for command in commands:
        words = shlex.split(command, comments=True) if "$'" not in command else None
        if words is None:
            continue  # ANSI-C quoting: that line is in a block test_quick_tour_and_python_blocks_run_as_written runs
        operators = [k for k, word in enumerate(words) if word in ("&", "&&", "|", ";", ">")]
        words = words[: operators[0]] if operators else words
        if words[0] == "python":
            if not words[1].endswith(".py"):
                continue
            path = README.parent / words[1]
            if not path.exists():
                refused.append(f"{command}: no {words[1]}")
                continue
            monkeypatch.setattr(sys, "argv", [str(path), *words[2:]])
            monkeypatch.syspath_prepend(str(path.parent))
            run = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
        else:
            monkeypatch.setattr(sys, "argv", ["memory3", *words[1:]])
            run = lambda: runpy.run_module("memory3.cli.main", run_name="__main__", alter_sys=False)  # noqa: E731
        try:
            run()
            refused.append(f"{command}: ran without parsing a command line")
        except _Accepted:
            pass
        except SystemExit as exit_:  # --help exits 0 from inside parse_args; a refused flag exits 2
            if exit_.code not in (0, None):
                refused.append(f"{command}: exit {exit_.code}")
    assert not refused, "\n".join(refused)
