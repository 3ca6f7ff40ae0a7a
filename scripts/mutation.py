"""Mutation testing of the code that carries memory3's promises, with cosmic-ray.

For each target — a module, the functions or classes in it that carry a promise, and the tests
that guard them — cosmic-ray makes every mutant of the module; mutants outside the named scope
and the redundant variants of each operator site (a `+` turned into `<<`, `**`, `%` … besides
`-`) are skipped; the rest run the target's tests, one mutant at a time. A surviving mutant is a
change to the code that no test notices. Mutants run in a copy of the checkout (imported ahead
of the editable install), so the working tree is never changed. Prints, per target, killed /
survived and each survivor (line, operator, the change); `--write` records it in docs/mutation.md.

    python scripts/mutation.py                 # every target (tens of minutes on 2 cores)
    python scripts/mutation.py vtrace auth     # some targets
    python scripts/mutation.py codec-validation --recheck SESSION.sqlite   # survivors again, after new tests
    python scripts/mutation.py decoding-schedule --sample 60   # a seeded sample, where tests are slow
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

ROOT = Path(__file__).resolve().parent.parent
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider"


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    scope: tuple[str, ...]  # top-level functions or classes (a class: all its methods), or "Class.method"
    tests: str  # pytest arguments


TARGETS = [
    Target("vtrace", "trainer/proxy_rl.py", ("vtrace",), "tests/test_proxy_rl.py -k vtrace"),
    Target("codec-validation", "core/blob.py", ("read_header", "validate_payload", "payload_checksum"),
           "tests/test_codec.py tests/test_hostile_inputs.py -k 'not fuzz and (reject or truncat or trailing or "
           "spec or fingerprint or zstd or header or checksum or crc)'"),
    Target("auth", "service/auth.py", ("presented_key", "Authenticator", "check_admin_key_strength"),
           "tests/test_isolation.py tests/test_hostile_inputs.py tests/test_hostile_clients.py "
           "-k 'key or admin or bearer or tenant or authorization'"),
    Target("tenant-store", "service/tenant_store.py", ("TenantStore", "_hash_secret"),
           "tests/test_tenant_store.py tests/test_isolation.py"),
    Target("call-guard", "service/guard.py", ("AdminAttempts", "CallGuard"),
           "tests/test_hostile_clients.py -k 'keyless or idle or concurrency or revok or revoc or admin or stops_reading'"),
    Target("injection", "sdk/memory/injection.py", ("_sdpa_would_be_causal", "_context_mask", "extend_mask",
                                                    "MemoryInjector"),
           "tests/test_injection.py tests/test_conformance.py -k 'not bfloat16 and (test_injection or llama or cohere "
           "or smollm3 or gpt_neox or gemma2 or beams or prior or batch or cache or zero or hand or broadcast)'"),
    Target("decoding-schedule", "sdk/generation.py", ("_Run.prefill", "_Run.run", "_Run.inject", "chunk_queries",
                                                       "submit_prompt_queries"),
           "tests/test_decoding.py -k 'not cli and not seeded and not refuses'"),
    Target("positions", "sdk/model/positions.py", ("LayerRotation", "ModelGeometry", "_pair_angles", "_fit",
                                                   "_classify", "probe_geometry"),
           "tests/test_conformance.py tests/test_injection.py -k 'not bfloat16 and (llama or cohere or smollm3 "
           "or gpt_neox or deepseek or gpt2 or falcon or rotation or parallel)'"),
]

# One variant per operator site is enough to ask "does a test notice a change here?"
REDUNDANT = re.compile(
    r"core/ReplaceBinaryOperator_\w+_(RShift|LShift|Pow|Mod|BitOr|BitAnd|BitXor|FloorDiv|MatMult|Div)$"
    r"|core/ReplaceComparisonOperator_\w+_(Is|IsNot|In|NotIn)$"
)


def scope_lines(module: Path, names: tuple[str, ...]) -> tuple[list[range], set[int]]:
    """Line ranges of the named top-level definitions, and the lines of their functions' signatures
    (annotations are not evaluated here — ``from __future__ import annotations`` — so mutants there
    are equivalent by construction)."""
    tree = ast.parse(module.read_text())
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    chosen = [node for node in tree.body if isinstance(node, defs) and node.name in names]
    chosen += [method for node in tree.body if isinstance(node, ast.ClassDef) for method in node.body
               if isinstance(method, defs) and f"{node.name}.{method.name}" in names]  # "Class.method"
    ranges = [range(node.lineno, node.end_lineno + 1) for node in chosen]
    signatures = {line for top in chosen for node in ast.walk(top)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for line in range(node.lineno, node.body[0].lineno)}
    missing = set(names) - {n.name for n in tree.body if hasattr(n, "name")} - {
        f"{n.name}.{m.name}" for n in tree.body if isinstance(n, ast.ClassDef) for m in n.body if hasattr(m, "name")}
    if missing:
        sys.exit(f"{module}: no {', '.join(sorted(missing))} at top level (scripts/mutation.py TARGETS)")
    return ranges, signatures


PACKAGE_DIRS = {"core": "core", "service": "service", "sdk": "sdk", "trainer": "trainer", "cli": "cli",
                "migrations": "migrations"}


def make_sandbox(workdir: Path) -> Path:
    """A copy of the checkout to mutate, importable as ``memory3`` ahead of the editable install
    (through PYTHONPATH), so the working tree is never touched while mutants run."""
    sandbox = workdir / "repo"
    shutil.copytree(ROOT, sandbox, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info",
                                                                  ".hypothesis", ".ruff_cache"))
    package = sandbox / ".mutpath" / "memory3"
    shutil.copytree(sandbox / "proto" / "memory3", package)
    for name, folder in PACKAGE_DIRS.items():
        (package / name).symlink_to(sandbox / folder, target_is_directory=True)
    return sandbox


def run(target: Target, workdir: Path, sandbox: Path, sample: int | None = None) -> tuple[int, int, list[tuple[int, str, str]]]:
    config = workdir / f"{target.name}.toml"
    session = workdir / f"{target.name}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target.module}"\n'
        "timeout = 300.0\n"
        "excluded-modules = []\n"
        f'test-command = "env PYTHONPATH={sandbox / ".mutpath"} {PYTEST} {target.tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    baseline = subprocess.run(f"env PYTHONPATH={sandbox / '.mutpath'} {PYTEST} {target.tests}", shell=True,
                              cwd=sandbox, capture_output=True, text=True)
    if baseline.returncode != 0:  # every mutant would count as killed
        sys.exit(f"{target.name}: the tests fail without any mutant:\n{baseline.stdout[-2000:]}")
    probe = subprocess.run([sys.executable, "-c", "import memory3.core; print(memory3.core.__file__)"], cwd=sandbox,
                           env={**os.environ, "PYTHONPATH": str(sandbox / ".mutpath")}, capture_output=True, text=True)
    if not probe.stdout.startswith(str(sandbox)):
        sys.exit(f"the sandbox is not what the tests import: {probe.stdout or probe.stderr}")
    cosmic = [sys.executable, "-m", "cosmic_ray.cli"]
    if session.exists():  # cosmic-ray refuses to init over a session; the last one is kept beside it
        session.replace(session.with_suffix(".previous.sqlite"))
    subprocess.run([*cosmic, "init", str(config), str(session)], cwd=sandbox, check=True, capture_output=True)
    module_digest(session).write_text(digest_of(sandbox / target.module))  # --recheck applies positions to it
    lines, signatures = scope_lines(sandbox / target.module, target.scope)
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            mutation = item.mutations[0]
            inside = any(mutation.start_pos[0] in r for r in lines) and mutation.start_pos[0] not in signatures
            if not inside or REDUNDANT.search(mutation.operator_name):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="out of scope"))
        in_scope = list(db.pending_work_items)
        if sample is not None and len(in_scope) > sample:  # a seeded random sample estimates the score
            kept = {item.job_id for item in random.Random(0).sample(in_scope, sample)}
            for item in in_scope:
                if item.job_id not in kept:
                    db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not sampled"))
        pending = db.num_work_items - db.num_results
    print(f"{target.name}: {pending} mutants to run" + (f" (a sample of {len(in_scope)})" if pending < len(in_scope)
                                                         else ""), flush=True)
    subprocess.run([*cosmic, "exec", str(config), str(session)], cwd=sandbox, check=True)
    return summarize(session)


def summarize(session: Path) -> tuple[int, int, list[tuple[int, str, str]]]:
    """(killed, survived, survivors as (line, operator, diff)) of a finished session."""
    killed, survivors = 0, []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome != WorkerOutcome.NORMAL:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                mutation = item.mutations[0]
                survivors.append((mutation.start_pos[0], mutation.operator_name, result.diff or ""))
            else:
                killed += 1
    return killed, len(survivors), sorted(survivors)


def digest_of(module: Path) -> str:
    return hashlib.sha256(module.read_bytes()).hexdigest()


def module_digest(session: Path) -> Path:
    """Where a session records the SHA-256 of the module it mutated."""
    return session.with_suffix(".module-sha256")


def recheck(session: Path, target: Target) -> tuple[int, list[str]]:
    """Run a finished session's survivors again against today's tests (after tests were added to
    kill them): (how many are killed now, the ones that still survive). Mutations are recorded as
    positions in the module, so the module must be the one the session mutated."""
    from cosmic_ray.mutating import mutate_and_test

    recorded = module_digest(session)
    if not recorded.exists() or recorded.read_text() != digest_of(ROOT / target.module):
        sys.exit(f"{target.module} is not the module {session.name} mutated (it changed since, or the session "
                 f"predates the check): run `python scripts/mutation.py {target.name}` again instead")

    with use_db(str(session), WorkDB.Mode.open) as db:
        survivors = [item for item, result in db.completed_work_items
                     if result.worker_outcome == WorkerOutcome.NORMAL and result.test_outcome == TestOutcome.SURVIVED]
    killed, alive = 0, []
    with tempfile.TemporaryDirectory(prefix="memory3-recheck-") as tmp:
        sandbox = make_sandbox(Path(tmp))
        command = f"env PYTHONPATH={sandbox / '.mutpath'} {PYTEST} {target.tests}"
        here = os.getcwd()
        os.chdir(sandbox)
        try:
            for item in survivors:
                result = mutate_and_test(item.mutations, command, 300)
                mutation = item.mutations[0]
                if result.test_outcome == TestOutcome.KILLED:
                    killed += 1
                else:
                    alive.append(f"{target.module}:{mutation.start_pos[0]} {mutation.operator_name}")
        finally:
            os.chdir(here)
    return killed, alive


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(t.name for t in TARGETS)}")
    parser.add_argument("--write", action="store_true", help="record the results in docs/mutation.md")
    parser.add_argument("--report", type=Path, help="a folder of finished sessions: print (and --write) their table")
    parser.add_argument("--sample", type=int, help="run a seeded random sample of this many in-scope mutants "
                                                   "per target (an estimate of the score, for slow tests)")
    parser.add_argument("--recheck", type=Path, help="a finished session's .sqlite: run its survivors again "
                                                     "(with one target named)")
    args = parser.parse_args(argv)
    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets]
    if args.report:  # the table of finished sessions in a folder, without running anything
        rows = []
        for target in chosen:
            session = args.report / f"{target.name}.sqlite"
            if session.exists():
                rows.append((target, *summarize(session)))
        return write_report(rows, args.write)
    if args.recheck:
        [target] = [t for t in TARGETS if t.name in args.targets] or sys.exit("--recheck needs one target name")
        killed, alive = recheck(args.recheck, target)
        print(f"{target.name}: of the survivors, {killed} are killed now, {len(alive)} survive")
        for line in alive:
            print(f"  still surviving {line}")
        return
    rows = []
    sessions = ROOT / "runs" / "mutation"  # kept (git-ignored) for --recheck
    sessions.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memory3-mutation-") as tmp:
        sandbox = make_sandbox(Path(tmp))
        for target in chosen:
            killed, survived, survivors = run(target, sessions, sandbox, args.sample)
            rows.append((target, killed, survived, survivors))
            print(f"{target.name}: killed {killed}, survived {survived}", flush=True)
            for line, operator, diff in survivors:
                print(f"  survivor {target.module}:{line} {operator}", flush=True)
    write_report(rows, args.write)


def write_report(rows, write: bool) -> None:
    lines = ["| target | module | scope | killed | survived | score |", "|---|---|---|---:|---:|---:|"]
    for target, killed, survived, _ in rows:
        total = killed + survived
        lines.append(f"| {target.name} | `{target.module}` | {', '.join(target.scope)} | {killed} | {survived} | "
                     f"{killed / total if total else float('nan'):.2f} |")
    details = []
    for target, _, _, survivors in rows:
        for line, operator, diff in survivors:
            changed = [d for d in diff.splitlines() if d.startswith(("-", "+")) and not d.startswith(("---", "+++"))]
            details.append(f"* {target.name} `{target.module}:{line}` {operator}: " + " → ".join(
                c[1:].strip() for c in changed))
    report = "\n".join(lines + ["", "Survivors:", ""] + (details or ["(none)"]))
    print(report)
    if write:
        (ROOT / "docs" / "mutation.md").write_text(
            "# Mutation testing\n\n`python scripts/mutation.py --write` (cosmic-ray; scope and operators in the "
            "script). A survivor is a change to promise-carrying code that no test notices.\n\n" + report + "\n")


if __name__ == "__main__":
    main()
