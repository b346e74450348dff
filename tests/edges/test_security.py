"""TLS, mutual TLS and bearer-token auth, with certificates this test generates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import shutil
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AsyncClassifierClient, ClassifierClient
from client.__main__ import main as client_main
from server.daemon import Daemon
from server.edges.common.auth import SecurityConfigError
from server.edges.grpc.security import ADMIN_METHODS, AdminCheck, is_local_peer
from tests.support.kit import REPO, local_config, running_daemon

pytestmark = pytest.mark.timeout(120)
PIXELS = np.zeros((8, 8), np.uint8)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("classifyd test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _write(directory, "server", _cert("classifyd", server_key, ca, ca_key, server=True), server_key)
    client = _write(directory, "client", _cert("a client", client_key, ca, ca_key), client_key)
    rogue = _write(directory, "rogue", _cert("rogue client", rogue_key, rogue_ca, rogue_ca_key), rogue_key)
    return Pki(ca_path, *server, *client, *rogue)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    return root


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(pki: Pki, models: Path) -> None:
    with running_daemon(models, watch=False, tls_cert=pki.server_cert, tls_key=pki.server_key) as daemon:
        with ClassifierClient(daemon.target, tls_ca=pki.ca) as client:
            assert client.classify_tensor(PIXELS, timeout=20).model == "digits"
        with ClassifierClient(f"localhost:{daemon.port}", tls_ca=pki.ca) as client:  # the DNS name works too
            assert client.list_models(timeout=20)
        with ClassifierClient(daemon.target) as plaintext, pytest.raises(grpc.RpcError) as caught:
            plaintext.classify_tensor(PIXELS, timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_a_foreign_one(pki: Pki, models: Path) -> None:
    with running_daemon(models, watch=False, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        tls_client_ca=pki.ca) as daemon:
        with ClassifierClient(daemon.target, tls_ca=pki.ca, tls_cert=pki.client_cert,
                              tls_key=pki.client_key) as client:
            assert client.classify_tensor(PIXELS, timeout=20).predictions
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
            with ClassifierClient(daemon.target, tls_ca=pki.ca, tls_cert=cert, tls_key=key) as client, \
                    pytest.raises(grpc.RpcError) as caught:
                client.classify_tensor(PIXELS, timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_token_auth_refuses_missing_and_wrong_tokens_but_health_answers(tmp_path: Path, models: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token-1234\nnew-token-5678\n")
    with running_daemon(models, watch=False, auth_token_file=tokens) as daemon:
        for token in ("old-token-1234", "new-token-5678"):
            with ClassifierClient(daemon.target, token=token) as client:
                assert client.classify_tensor(PIXELS, timeout=20).predictions
                assert [e.model for e in client.stub.ClassifyStream(iter([pb.ClassifyRequest(
                    tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[8, 8], data=bytes(64)))]), timeout=20)]
        for token, words in ((None, "missing bearer token"), ("wrong-token", "invalid bearer token"),
                             ("old-token-123", "invalid bearer token")):
            with ClassifierClient(daemon.target, token=token) as client:
                for call in (lambda c: c.classify_tensor(PIXELS, timeout=20), lambda c: c.list_models(timeout=20),
                             lambda c: list(c.watch_models(include_current=True))):
                    with pytest.raises(grpc.RpcError) as caught:
                        call(client)
                    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
                    assert words in caught.value.details()
        # a refusal is a handler made for its call: the good token's calls that follow must not get it
        # (the interceptor reuses its wrappers per method: server/edges/grpc/wrapped.py)
        with ClassifierClient(daemon.target, token="new-token-5678") as client:
            assert client.classify_tensor(PIXELS, timeout=20).predictions
        with grpc.insecure_channel(daemon.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="digits"), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


async def _async_classify(target: str, pki: Pki, token: str) -> str:
    async with AsyncClassifierClient(target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key,
                                     token=token) as client:
        request = pb.ClassifyRequest(request_id="s", tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[8, 8],
                                                                      data=bytes(64)))
        streamed = [r async for r in client.stub.ClassifyStream(iter([request]), timeout=20)]
        assert [r.request_id for r in streamed] == ["s"] and not streamed[0].HasField("error")
        events = client.watch_models(include_current=True)
        assert (await anext(events)).model == "digits"
        await events.aclose()
        return (await client.classify_tensor(PIXELS, timeout=20)).model


def test_tls_with_token_through_the_async_client_and_the_cli(pki: Pki, models: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with running_daemon(models, watch=False, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        tls_client_ca=pki.ca, auth_token_file=token_file) as daemon:
        assert asyncio.run(_async_classify(daemon.target, pki, "s3cret-token")) == "digits"
        connection = ["--target", daemon.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                      "--tls-key", str(pki.client_key)]
        assert client_main([*connection, "--token-file", str(token_file), "models"]) == 0
        assert "digits (default)" in capsys.readouterr().out
        assert client_main([*connection, "models"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_bad_security_settings_are_refused_at_start(pki: Pki, models: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match="both a certificate and its key"):
        Daemon(local_config(models, tls_cert=pki.server_cert))
    with pytest.raises(SecurityConfigError, match="needs --tls-cert"):
        Daemon(local_config(models, tls_client_ca=pki.ca))
    with pytest.raises(SecurityConfigError, match="is empty"):
        Daemon(local_config(models, auth_token_file=empty))
    with pytest.raises(SecurityConfigError, match="cannot read token file"):
        Daemon(local_config(models, auth_token_file=tmp_path / "missing"))


def _http_get(port: int, path: str, context: ssl.SSLContext, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_http_port_requires_the_same_tls_client_certificate_and_token(pki: Pki, models: Path,
                                                                           tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("http-token-1\n")
    with running_daemon(models, watch=False, http_port=0, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        tls_client_ca=pki.ca, auth_token_file=tokens) as daemon:
        port = daemon.daemon.http_port
        context = ssl.create_default_context(cafile=pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        status, body = _http_get(port, "/v1/models", context, "http-token-1")
        assert status == 200 and [m["name"] for m in body["models"]] == ["digits"]
        for token, words in ((None, "missing bearer token"), ("nope", "invalid bearer token")):
            status, body = _http_get(port, "/v1/models", context, token)
            assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
            assert words in body["error"]["message"]
        assert _http_get(port, "/v2/health/live", context)[0] == 200  # probes need no token
        without_certificate = ssl.create_default_context(cafile=pki.ca)
        with pytest.raises(OSError):  # the TLS handshake refuses it (SSLError, URLError or a reset)
            _http_get(port, "/v2/health/live", without_certificate)


RELOAD = "/classifier.v1.Classifier/ReloadModel"


def test_model_control_needs_an_admin_token_and_client_tokens_do_not_suffice(tmp_path: Path, models: Path) -> None:
    clients, admins = tmp_path / "client-tokens", tmp_path / "admin-tokens"
    clients.write_text("client-token-1234\n")
    admins.write_text("admin-token-5678\n")
    with running_daemon(models, watch=False, auth_token_file=clients, admin_token_file=admins) as daemon:
        with ClassifierClient(daemon.target, token="client-token-1234") as client:
            assert client.classify_tensor(PIXELS, timeout=20).predictions
            with pytest.raises(grpc.RpcError) as caught:
                client.reload_model("digits", timeout=60)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "client tokens (--auth-token-file) do not suffice" in caught.value.details()
        for token, words in ((None, "missing bearer token"), ("admin-token-567", "invalid bearer token")):
            with ClassifierClient(daemon.target, token=token) as client, pytest.raises(grpc.RpcError) as caught:
                client.reload_model("digits", timeout=60)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED and words in caught.value.details()
        with ClassifierClient(daemon.target, token="admin-token-5678") as admin:
            assert admin.classify_tensor(PIXELS, timeout=20).predictions  # an operator's token is good for all
            assert admin.reload_model("digits", timeout=60).versions[0].generation == 2
            with pytest.raises(grpc.RpcError) as caught:  # --reload-min-interval-seconds, 5 s by default
                admin.reload_model("digits", timeout=60)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model digits was reloaded" in caught.value.details() and "retry in" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:  # ENAMETOOLONG on the filesystem: refused before
                admin.reload_model("x" * 300, timeout=60)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "300 bytes long" in caught.value.details()
    # only admin tokens: clients need none, model control still needs one
    with running_daemon(models, watch=False, admin_token_file=admins) as daemon, \
            ClassifierClient(daemon.target) as client:
        assert client.classify_tensor(PIXELS, timeout=20).predictions
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_model("digits", timeout=60)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_without_admin_tokens_model_control_is_accepted_from_loopback(models: Path) -> None:
    with running_daemon(models, watch=False) as daemon, ClassifierClient(daemon.target) as client:
        assert client.reload_model("digits", timeout=60).serving_version == 1


class Aborted(Exception):
    pass


@dataclass
class FakeContext:
    """What the check reads of a call's context: its peer; ``abort`` records the status."""

    address: str
    status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self.address

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted


@dataclass(frozen=True)
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def _call_through(check: AdminCheck, method: str, peer: str) -> object:
    """Call ``method`` through ``check`` from ``peer``: the handler's answer, or the status it aborted with."""

    async def handle(request: object, context: object) -> str:
        return "handled"

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(handle)

    async def call() -> object:
        handler = check.checked(await continuation(Details(method)), Details(method))
        context = FakeContext(peer)
        try:
            return await handler.unary_unary(None, context)
        except Aborted:
            return context.status

    return asyncio.run(call())


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:50000", True), ("ipv4:127.8.9.10:50000", True), ("ipv6:[::1]:50000", True),
    ("ipv6:%5B::1%5D:50000", True), ("ipv6:[::ffff:127.0.0.1]:50000", True), ("unix:/run/classifyd.sock", True),
    ("ipv4:10.0.0.7:50000", False), ("ipv6:[2001:db8::1]:50000", False), ("ipv6:[::ffff:10.0.0.7]:50000", False),
    ("unknown", False), ("ipv4:not-an-address:1", False),
])
def test_without_admin_tokens_model_control_is_for_local_peers_unless_remote_admin_is_allowed(peer: str,
                                                                                              local: bool) -> None:
    assert is_local_peer(peer) is local
    answer = _call_through(AdminCheck(), RELOAD, peer)
    if local:
        assert answer == "handled"
    else:
        assert isinstance(answer, tuple) and answer[0] is grpc.StatusCode.PERMISSION_DENIED
        assert f"not from {peer}" in answer[1] and "--admin-token-file" in answer[1]
    assert _call_through(AdminCheck(allow_remote=True), RELOAD, peer) == "handled"
    assert _call_through(AdminCheck(), "/classifier.v1.Classifier/Classify", peer) == "handled"
    assert RELOAD in ADMIN_METHODS
