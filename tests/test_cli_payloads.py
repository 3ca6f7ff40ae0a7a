"""The CLI's side of JSON metadata: `ingest` with any JSON values, `query --filter --json`,
`scroll [--filter] [--limit] [--json]` — each through the real `memory3` command in a
subprocess against a real server; a mistake in --filter, --limit or --page-size is one line
naming the option and the fix (exit 2), a server refusal one line with its status (exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FINGERPRINT, SPEC
from memory3.sdk.client import BankInfo, Client


def memory3(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_") and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "memory3.cli.main", *args], env=clean, capture_output=True,
                          text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess, status: int, *expected: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memory3: error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])

REFS = [
    {"id": f"r{i:02d}", "text": f"Telik Works fact number {i}", "metadata": {
        "year": 2015 + i, "lang": ["en", "de", "fr"][i % 3], "tags": ["x", f"t{i % 2}"], "score": i / 4,
        "draft": i == 3}}
    for i in range(12)
]


@pytest.fixture(scope="module")
def kb(server, api_key, tmp_path_factory):
    with Client(server.target, api_key) as client:
        client.create_bank(BankInfo("clipay", FINGERPRINT, SPEC))
    path = tmp_path_factory.mktemp("cli") / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REFS))
    result = memory3("ingest", "clipay", str(path), "--target", server.target, "--api-key", api_key)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["inserted"] == len(REFS)
    return ["--target", server.target, "--api-key", api_key]


def _lines(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_query_filters_and_prints_json_lines(kb):
    result = memory3("query", "clipay", "Telik Works fact", "--top-k", "20", "--json",
                     "--filter", '{"year": {"gte": 2020}, "lang": {"in": ["en", "de"]}}', *kb)
    hits = _lines(result)
    expected = {r["id"] for r in REFS if r["metadata"]["year"] >= 2020 and r["metadata"]["lang"] in ("en", "de")}
    assert {h["id"] for h in hits} == expected and len(hits) == len(expected)
    assert [h["rank"] for h in hits] == list(range(len(hits)))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    by_id = {r["id"]: r for r in REFS}
    for hit in hits:
        assert hit["metadata"] == by_id[hit["id"]]["metadata"] and hit["text"] == by_id[hit["id"]]["text"]
    plain = memory3("query", "clipay", "Telik Works fact", "--filter", '{"draft": true}', *kb)
    assert plain.returncode == 0 and plain.stdout.splitlines() == [f"1. {plain.stdout.split()[1]} r03: {REFS[3]['text']}"]


def test_scroll_lists_filters_limits_and_round_trips_through_ingest(kb, tmp_path):
    everything = _lines(memory3("scroll", "clipay", "--json", "--page-size", "5", *kb))
    assert [r["id"] for r in everything] == [r["id"] for r in REFS]
    assert [(r["text"], r["metadata"]) for r in everything] == [(r["text"], r["metadata"]) for r in REFS]
    tagged = _lines(memory3("scroll", "clipay", "--json", "--filter", '{"tags": "t1", "score": {"lt": 2}}', *kb))
    assert [r["id"] for r in tagged] == ["r01", "r03", "r05", "r07"]
    assert [r["id"] for r in _lines(memory3("scroll", "clipay", "--json", "--limit", "3", *kb))] == ["r00", "r01", "r02"]
    plain = memory3("scroll", "clipay", "--limit", "2", *kb)
    assert plain.returncode == 0 and plain.stdout.splitlines()[0].startswith('r00 {"lang":"en",')  # jsonb's key order
    dump = tmp_path / "dump.jsonl"
    dump.write_text(memory3("scroll", "clipay", "--json", *kb).stdout)
    with Client(kb[1], kb[3]) as client:
        client.create_bank(BankInfo("clipay-copy", FINGERPRINT, SPEC))
    assert memory3("ingest", "clipay-copy", str(dump), *kb).returncode == 0
    copied = _lines(memory3("scroll", "clipay-copy", "--json", *kb))
    assert [(r["id"], r["metadata"]) for r in copied] == [(r["id"], r["metadata"]) for r in REFS]


def test_scroll_into_a_closed_pipe_ends_quietly(kb):
    command = [sys.executable, "-m", "memory3.cli.main", "scroll", "clipay", "--page-size", "1", *kb]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in stderr and not stderr.strip(), stderr


@pytest.mark.parametrize("args, expected", [
    (["query", "clipay", "q", "--filter", "{year: 1}"], ["--filter is not JSON", "write e.g. --filter"]),
    (["query", "clipay", "q", "--filter", '{"year": {"gtee": 2020}}'], ["--filter key 'year'", "unknown operator 'gtee'"]),
    (["scroll", "clipay", "--filter", '{"year": {"gt": NaN}}'], ["--filter", "finite"]),
    (["scroll", "clipay", "--filter", '{"tags": ["x"]}'], ["--filter key 'tags' eq", "takes a string, number"]),
    (["scroll", "clipay", "--filter", '{"lang": {"in": []}}'], ["--filter key 'lang' in", "list of 1 to 1024"]),
    (["scroll", "clipay", "--filter", '["lang"]'], ["--filter must be a JSON object"]),
    (["scroll", "clipay", "--filter", '{"draft": {"exists": "yes"}}'], ["exists", "true (the key is present)"]),
    (["scroll", "clipay", "--limit", "0"], ["--limit 0", "at least 1"]),
    (["scroll", "clipay", "--page-size", "5000"], ["--page-size 5000", "1 to 1000"]),
])
def test_a_filter_or_option_mistake_is_one_line_naming_it(kb, args, expected):
    one_line_error(memory3(*args, *kb), 2, *expected)


def test_server_refusals_are_one_line_with_the_status(kb):
    one_line_error(memory3("scroll", "absent-bank", *kb), 1, "NOT_FOUND", "absent-bank")
    one_line_error(memory3("query", "clipay", "q", "--filter", json.dumps({"k": "x" * 20000}), *kb), 1,
                   "INVALID_ARGUMENT", "filter")


@pytest.mark.parametrize("metadata, expected", [
    ('{"n": NaN}', "finite number"),
    ('[1]', "must be a JSON object"),
    ('{"n": "a\\u0000"}', "NUL"),
    ('{"n": ' + "[" * 9 + "]" * 9 + "}", "deeper than 8"),
])
def test_ingest_names_bad_json_metadata_and_sends_nothing(kb, tmp_path, metadata, expected):
    path = tmp_path / "refs.jsonl"
    path.write_text('{"id": "fresh", "text": "fine"}\n{"id": "a", "text": "t", "metadata": ' + metadata + "}\n")
    one_line_error(memory3("ingest", "clipay", str(path), *kb), 2, f"{path}:2:", expected)
    with Client(kb[1], kb[3]) as client:
        assert client.stats("clipay").references == len(REFS)
