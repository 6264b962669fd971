"""TLS, mutual TLS and bearer tokens over real gRPC, with certificates made at test time."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import vitlens
from tests.conftest import start_server
from tests.polling import wait_for
from tests.tiny import tiny_loaded
from vitlens_server.cli import main as serve_main
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry

IMAGE = np.zeros((32, 32, 3), np.uint8)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(name: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("vitlens test CA", ca_key, "vitlens test CA", ca_key, ca=True)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, "vitlens test CA", ca_key, ca=False)
        files[f"{name}_cert"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{name}_key"] = _pem_key(key)
    paths = {}
    for name, data in files.items():
        (root / f"{name}.pem").write_bytes(data)
        paths[name] = root / f"{name}.pem"
    return {"files": files, "paths": paths}


def _serve(**config):
    running, stop = start_server(
        ServerConfig(port=0, **config), ModelRegistry([tiny_loaded(seed=9)])
    )
    return running, stop


def test_tls_and_mutual_tls(pki) -> None:
    files, paths = pki["files"], pki["paths"]
    running, stop = _serve(
        tls_cert=paths["server_cert"], tls_key=paths["server_key"], tls_client_ca=paths["ca"]
    )
    try:
        with_cert = grpc.ssl_channel_credentials(
            files["ca"], private_key=files["client_key"], certificate_chain=files["client_cert"]
        )
        with vitlens.Client(running.address, credentials=with_cert, timeout_s=30) as client:
            assert client.explain(IMAGE, method="rollout")[0].explanations
        without_cert = grpc.ssl_channel_credentials(files["ca"])
        for credentials in (without_cert, None):  # no client certificate; plaintext
            client = vitlens.Client(running.address, credentials=credentials, timeout_s=5)
            with client, pytest.raises(vitlens.UnavailableError):
                client.explain(IMAGE, method="rollout")
    finally:
        stop()


def test_tls_without_client_certificates(pki) -> None:
    files, paths = pki["files"], pki["paths"]
    running, stop = _serve(tls_cert=paths["server_cert"], tls_key=paths["server_key"])
    try:
        credentials = grpc.ssl_channel_credentials(files["ca"])
        with vitlens.Client(running.address, credentials=credentials, timeout_s=30) as client:
            assert client.predict(IMAGE)[0].predictions
    finally:
        stop()


def test_bearer_tokens(tmp_path) -> None:
    running, stop = _serve(auth_tokens=(b"first-secret", b"second-secret"))
    try:
        with vitlens.Client(running.address, token="second-secret", timeout_s=30) as client:
            assert client.explain(IMAGE, method="rollout")[0].explanations
            assert client.evaluate(["random"], ["segmentation"], dataset="synthetic:1", model="")
        for token in (None, "wrong", "second-secret-but-longer"):
            with vitlens.Client(running.address, token=token, timeout_s=10) as client:
                with pytest.raises(vitlens.UnauthenticatedError, match="bearer token"):
                    client.predict(IMAGE)
                with pytest.raises(vitlens.UnauthenticatedError):
                    client.evaluate(["random"], ["segmentation"], dataset="synthetic:1")
        sample = running.server.telemetry.registry.get_sample_value
        for rpc in ("Predict", "Evaluate"):  # refusals are counted like any other answer
            labels = {"rpc": rpc, "method": "", "code": "UNAUTHENTICATED"}
            # counted as the handler ends, which may be just after the caller has its answer
            wait_for(
                lambda labels=labels: sample("vitlens_requests_total", labels) == 3,
                10,
                describe=lambda labels=labels: sample("vitlens_requests_total", labels),
            )
        with grpc.insecure_channel(running.address) as channel:  # probes need no token
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "/x.pem"], "needs --tls-cert"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], "not a readable file"),
        (["--devices", ","], "names no device"),
        (["--auth-token-file", "/nonexistent-tokens"], "nonexistent-tokens"),
    ],
)
def test_configuration_errors_exit_non_zero_with_a_message(argv, message, capsys) -> None:
    assert serve_main(["--port", "0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_messages_above_the_limit_are_refused() -> None:
    running, stop = _serve(max_message_bytes=64 * 1024)
    try:
        big = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # 196 KB
        with vitlens.Client(running.address, timeout_s=10) as client:
            with pytest.raises(vitlens.ResourceExhaustedError):
                client.predict(big)
            assert client.predict(IMAGE)[0].predictions  # small ones still pass
    finally:
        stop()
