"""gRPC over TLS (issue 20): the server takes a certificate and key from its settings, the SDK and
the CLI a CA file; a plain-text client gets no answer from a TLS server. The certificate is made
here, for 127.0.0.1 and localhost, with the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ADMIN_KEY, ServerThread, make_settings
from helpers import expect_status
from memory3.sdk.client import Client


def _certificate(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memory3 test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(database_url, embedder, tmp_path_factory):
    cert_file, key_file = _certificate(tmp_path_factory.mktemp("tls"))
    srv = ServerThread(make_settings(database_url, tls_cert_file=cert_file, tls_key_file=key_file), embedder)
    yield srv, cert_file
    srv.stop()


def test_sdk_and_cli_talk_to_a_tls_server_with_its_ca(tls_server):
    srv, ca = tls_server
    with Client(srv.target, ADMIN_KEY, ca_file=ca) as admin:
        admin.create_tenant("tls-tenant")
        assert "tls-tenant" in admin.list_tenants()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_")}
    result = subprocess.run([sys.executable, "-m", "memory3.cli.main", "health", "--target", srv.target,
                             "--ca-file", str(ca)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING", result.stderr
    result = subprocess.run([sys.executable, "-m", "memory3.cli.main", "tenant", "list", "--target", srv.target],
                            env={**env, "MEMORY3_CA_FILE": str(ca), "MEMORY3_ADMIN_KEY": ADMIN_KEY},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "tls-tenant" in result.stdout, result.stderr


def test_plain_text_clients_get_nothing_from_a_tls_server(tls_server):
    srv, _ = tls_server
    with Client(srv.target, ADMIN_KEY, timeout=5) as plain, expect_status(grpc.StatusCode.UNAVAILABLE):
        plain.list_tenants()


def test_tls_needs_both_certificate_and_key(database_url, tmp_path):
    cert_file, _ = _certificate(tmp_path)
    with pytest.raises(ValueError, match="both MEMORY3_TLS_CERT_FILE and MEMORY3_TLS_KEY_FILE"):
        ServerThread(make_settings(database_url, tls_cert_file=cert_file))
