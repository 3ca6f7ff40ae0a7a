"""The proxy registry through real gRPC and PostgreSQL: Publish -> Get -> List round trip with
checksums and chunking, version assignment, idempotent re-publish, the model-fingerprint check,
tenant isolation and bad input."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from helpers import FINGERPRINT, expect_status
from memory3.sdk.client.client import Client
from memory3.sdk.client.trajectories import publish_requests
from memory3.v1 import proxies_pb2

OTHER_MODEL = "cd34" * 16


def weights(seed: int, rows: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"head.weight": rng.standard_normal((rows, 32)).astype(np.float32),
                             "head.bias": rng.standard_normal(rows).astype(np.float32)})


def test_publish_get_list_round_trip(client):
    big = weights(0, rows=20_000)  # ~2.6 MB: travels in several 1 MiB chunks both ways
    v1 = client.publish_proxy("accept", big, FINGERPRINT, metrics={"reward": 0.25}, config={"hidden": 64})
    assert (v1.version, v1.parent_version, v1.weights_size) == (1, 0, len(big))
    assert v1.weights_sha256 == hashlib.sha256(big).hexdigest()
    v2 = client.publish_proxy("accept", weights(1), FINGERPRINT, parent_version=1, metrics={"reward": 0.5})
    assert (v2.version, v2.parent_version) == (2, 1)
    latest = client.get_proxy("accept", FINGERPRINT)
    assert latest.version == 2 and latest.weights == weights(1) and latest.metrics == {"reward": 0.5}
    first = client.get_proxy("accept", FINGERPRINT, version=1)
    assert first.weights == big and first.config == {"hidden": 64} and first.created_at is not None
    tensors = load_safetensors(first.weights)
    assert tensors["head.weight"].shape == (20_000, 32)
    info_only = client.get_proxy("accept", FINGERPRINT, include_weights=False)
    assert info_only.weights is None and info_only.weights_size == len(weights(1))
    client.publish_proxy("reject-all", weights(2), FINGERPRINT)
    listed = client.list_proxies()
    assert [(p.name, p.version) for p in listed] == [("accept", 1), ("accept", 2), ("reject-all", 1)]
    assert [p.version for p in client.list_proxies("accept")] == [1, 2]


def test_republish_is_idempotent_and_versions_count_per_name(client):
    blob = weights(3)
    a = client.publish_proxy("p", blob, FINGERPRINT, metrics={"m": 1.0})
    again = client.publish_proxy("p", blob, FINGERPRINT, metrics={"m": 1.0})  # a retry after a lost reply
    assert again.version == a.version == 1
    changed = client.publish_proxy("p", blob, FINGERPRINT, metrics={"m": 2.0})  # new metadata: new version
    assert changed.version == 2
    assert client.publish_proxy("q", blob, FINGERPRINT).version == 1


def test_proxy_for_another_model_is_refused(client):
    client.publish_proxy("fp", weights(4), FINGERPRINT)
    with expect_status(grpc.StatusCode.FAILED_PRECONDITION, "trained for model"):
        client.get_proxy("fp", OTHER_MODEL)
    with expect_status(grpc.StatusCode.FAILED_PRECONDITION, "another model"):
        client.publish_proxy("fp", weights(5), OTHER_MODEL, parent_version=1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "model_fingerprint"):
        client.get_proxy("fp", "")


def test_tenant_isolation(server, client, new_tenant):
    client.publish_proxy("mine", weights(6), FINGERPRINT)
    other = new_tenant()
    with Client(server.target, other.api_key) as intruder:
        with expect_status(grpc.StatusCode.NOT_FOUND):
            intruder.get_proxy("mine", FINGERPRINT)
        assert intruder.list_proxies() == []
        with expect_status(grpc.StatusCode.NOT_FOUND, "parent"):
            intruder.publish_proxy("mine", weights(7), FINGERPRINT, parent_version=1)
        assert intruder.publish_proxy("mine", weights(7), FINGERPRINT).version == 1  # its own lineage
    assert client.get_proxy("mine", FINGERPRINT).weights == weights(6)


def test_bad_input(client):
    blob = weights(8)
    with expect_status(grpc.StatusCode.NOT_FOUND):
        client.get_proxy("nothing", FINGERPRINT)
    client.publish_proxy("b", blob, FINGERPRINT)
    with expect_status(grpc.StatusCode.NOT_FOUND, "version 9"):
        client.get_proxy("b", FINGERPRINT, version=9)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "safetensors"):
        client.publish_proxy("b", b"not a safetensors file at all", FINGERPRINT)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "proxy name"):
        client.publish_proxy("bad name!", blob, FINGERPRINT)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "config_json"):
        client.publish_proxy("b", blob, FINGERPRINT, config=[1, 2])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "finite"):
        client.publish_proxy("b", blob, FINGERPRINT, metrics={"reward": float("nan")})

    def send(messages):
        async def run():
            return await client._async.client_stream(client._async.proxies.Publish, messages)

        return client._run(run())

    corrupt = list(publish_requests("b", blob, FINGERPRINT, 0, None, None, chunk_bytes=1024))
    corrupt[2] = proxies_pb2.PublishRequest(weights_chunk=b"\x00" * len(corrupt[2].weights_chunk))
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "sha256"):
        send(corrupt)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "stream carried"):
        send(list(publish_requests("b", blob, FINGERPRINT, 0, None, None, chunk_bytes=1024))[:-1])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "first Publish message"):
        send([proxies_pb2.PublishRequest(weights_chunk=b"x")])
    assert [p.version for p in client.list_proxies("b")] == [1]  # nothing refused was stored


def test_train_proxy_init_makes_and_publishes_the_first_version(tmp_path, server, api_key):
    """`memory3 train-proxy --init`: a proxy for the model, published (version 1) and saved under
    that version, so the next training's --parent names the version that sampled; the help text
    explains the loop, and leaving out both --parent and --init is one clear error."""
    import subprocess
    import sys

    from memory3.sdk.model.fingerprint import model_fingerprint
    from memory3.sdk.model.positions import memory_spec_for
    from memory3.sdk.proxy.policy import ProxyPolicy
    from memory3.trainer.model import save_reference_model
    from memory3.trainer.proxy_rl import main as train_proxy_main
    from tiny_models import byte_tokenizer, tiny_llama

    model, spec_dir = tiny_llama(seed=3), tmp_path / "model"
    save_reference_model(model, byte_tokenizer(), memory_spec_for(model, (0,), 4, 32), spec_dir)
    proxy = train_proxy_main(["--init", "--model", str(spec_dir), "--out", str(tmp_path / "first"),
                              "--target", server.target, "--api-key", api_key, "--publish", "guide"])
    saved = ProxyPolicy.load(tmp_path / "first")
    assert proxy.version == saved.version == 1
    with Client(server.target, api_key) as client:
        published = client.get_proxy("guide", model_fingerprint(model))
    assert published.version == 1 and published.parent_version == 0
    assert saved.config.model_fingerprint == model_fingerprint(model)
    command = [sys.executable, "-m", "memory3.cli.main", "train-proxy"]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--init" in help_text and "the loop, from nothing to a retrained proxy" in help_text
    missing = subprocess.run([*command, "--model", str(spec_dir), "--out", str(tmp_path / "x"), "--episodes", "e.parquet"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "give --parent DIR" in missing.stderr
