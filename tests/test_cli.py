"""The CLI's error paths (issue 20): every user mistake ends within a deadline with one line on
stderr — what, where, how to fix — never a traceback and never a secret. Each case runs the real
`memory3` command in a subprocess against a real server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ADMIN_KEY
from helpers import SPEC
from memory3.sdk.client import BankInfo, Client

DEADLINE = 60  # seconds; a hang fails the test instead of blocking the suite


def memory3(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_") and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "memory3.cli.main", *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=DEADLINE, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, status: int, *expected: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memory3: error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def kb(server, api_key):
    with Client(server.target, api_key) as client:
        client.create_bank(BankInfo("cli", "f" * 16, SPEC, "client", 2, "l2"))
    return server.target, api_key


@pytest.mark.parametrize("line, expected", [
    ('{"id": "a", "text": "t",}', "not JSON"),                       # trailing comma: once hung forever
    ('{"text": "no id"}', 'missing "id"'),
    ('{"id": "a", "text": "t", "metadata": {"n": NaN}}', '"metadata"[\'n\'] must be a finite number'),
    ('["a", "b"]', "must be a JSON object"),
    ('{"id": "a", "text": "t", "memory": "%%%not base64"}', '"memory" is not base64'),
    ('{"id": "a", "text": "t", "embedding": "x"}', '"embedding" must be a list of numbers'),
])
def test_ingest_names_the_bad_line_and_sends_nothing(kb, tmp_path, line, expected):
    target, key = kb
    path = tmp_path / "refs.jsonl"
    path.write_text('{"id": "ok", "text": "fine", "embedding": [1, 0]}\n' + line + "\n")
    result = memory3("ingest", "cli", str(path), "--target", target, "--api-key", key)
    one_line_error(result, 2, f"{path}:2:", expected)
    with Client(target, key) as client:
        assert client.stats("cli").references == 0  # the good first line was not sent either


def test_a_missing_file_is_one_line(kb, tmp_path):
    target, key = kb
    one_line_error(memory3("ingest", "cli", str(tmp_path / "absent.jsonl"), "--target", target, "--api-key", key),
                   2, "absent.jsonl", "no such file")


def test_a_bad_database_url_names_the_problem_and_hides_the_password(tmp_path):
    result = memory3("serve", "--port", "0", env={"DATABASE_URL": "mysql://user:hunter2secret@db/x",
                                                  "MEMORY3_DATA_DIR": str(tmp_path), "MEMORY3_METRICS_PORT": "-1"})
    line = one_line_error(result, 2, "DATABASE_URL", "mysql")
    assert "hunter2secret" not in result.stderr + result.stdout and "hunter2secret" not in line


def test_a_bad_setting_names_its_variable(tmp_path):
    one_line_error(memory3("tenant", "list", env={"MEMORY3_PORT": "fifty"}), 2, "MEMORY3_PORT")


def test_no_server_says_where_it_looked_and_what_to_check():
    one_line_error(memory3("bank", "list", "--target", "127.0.0.1:9", "--api-key", "m3_" + "0" * 16 + "_" + "x" * 43),
                   1, "UNAVAILABLE", "memory3 serve", "MEMORY3_TARGET")


def test_a_wrong_key_is_unauthenticated_and_never_echoed(kb):
    target, _ = kb
    wrong = "m3_0123456789abcdef_" + "s3cr3t" * 8
    result = memory3("bank", "list", "--target", target, "--api-key", wrong)
    one_line_error(result, 1, "UNAUTHENTICATED", "--api-key")
    assert "s3cr3t" not in result.stderr


def test_admin_commands_take_the_admin_key_from_the_environment(server):
    result = memory3("tenant", "create", "cli-env-admin", "--target", server.target,
                     env={"MEMORY3_ADMIN_KEY": ADMIN_KEY})
    assert result.returncode == 0, result.stderr
    one_line_error(memory3("tenant", "list", "--target", server.target, env={"MEMORY3_DATA_DIR": "/nonexistent"}),
                   2, "no admin key", "MEMORY3_ADMIN_KEY")


def test_serve_help_lists_every_setting():
    from memory3.service.config import Settings

    result = memory3("serve", "--help")
    assert result.returncode == 0
    for name in Settings.model_fields:
        variable = "DATABASE_URL" if name == "database_url" else f"MEMORY3_{name.upper()}"
        assert variable in result.stdout, variable


def test_train_help_lists_the_presets_and_a_bad_config_is_one_line(tmp_path):
    help_text = memory3("train", "--help").stdout
    assert "presets (trainer/configs" in help_text and "--set KEY=VALUE" in help_text
    for preset in ("tiny", "small", "gpu", "tiny-pq"):
        assert f"  {preset} " in help_text
    one_line_error(memory3("train", "tinny"), 2, "'tinny'", "no such preset", "tiny")
    one_line_error(memory3("train", "tiny", "--set", "world"), 2, "not key=value")
    one_line_error(memory3("train-proxy", "--init", "--model", str(tmp_path), "--out", str(tmp_path / "p")),
                   2, "has no config.json", "memory3 train")


def test_ingest_with_model_stores_the_memories_the_encoder_makes(kb, server, api_key, tmp_path):
    """`ingest --model DIR`: each text's memory encoded by the bank's model and stored (too short:
    text only); a bank made for another model is refused in one line before anything is sent."""
    import torch

    from memory3.sdk.memory import MemoryEncoder, decode_memory
    from memory3.sdk.model.positions import memory_spec_for
    from memory3.trainer.model import save_reference_model
    from tiny_models import byte_tokenizer, tiny_llama

    model, tokenizer = tiny_llama(seed=21), byte_tokenizer()
    spec = memory_spec_for(model, (0, 1), tokens_per_head=4, reference_length=64)
    save_reference_model(model, tokenizer, spec, tmp_path / "model")
    texts = {"long": "The lighthouse keeper counted ships at dawn.", "short": "Hi."}
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(f'{{"id": "{i}", "text": "{t}"}}\n' for i, t in texts.items()))
    connect = ["--target", server.target, "--api-key", api_key]
    assert memory3("bank", "create", "withmodel", "--model", str(tmp_path / "model"), *connect).returncode == 0
    result = memory3("ingest", "withmodel", str(path), "--model", str(tmp_path / "model"), *connect)
    assert result.returncode == 0, result.stderr
    with Client(server.target, api_key) as client:
        stored = {r.external_id: r for r in client.fetch("withmodel", list(texts), include_memory=True)}
    assert not stored["short"].memory
    [expected] = MemoryEncoder(model, tokenizer, spec).encode([texts["long"]])
    got = decode_memory(stored["long"].memory)
    assert torch.equal(got.positions, expected.positions) and got.fingerprint == expected.fingerprint
    torch.testing.assert_close(got.kv, expected.kv, atol=0.05, rtol=0.05)  # the bank's int8 codec
    one_line_error(memory3("ingest", "cli", str(path), "--model", str(tmp_path / "model"), *connect),
                   2, "bank 'cli' is not for the model", "bank create NAME --model")
