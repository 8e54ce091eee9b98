"""`loraplex serve` over TLS, and mutual TLS with a client CA."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from loraplex.clients.client import Client, LoraplexError


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command makes the test certificates"
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)


def _ca(root: Path, name: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}-ca.pem", root / f"{name}-ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", f"/CN={name} test CA", "-keyout", str(key), "-out", str(cert))
    return cert, key


def _signed(root: Path, name: str, ca: tuple[Path, Path], san: str | None) -> tuple[Path, Path]:
    cert, key, csr, ext = (root / f"{name}.pem", root / f"{name}.key", root / f"{name}.csr", root / f"{name}.ext")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "1", "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = _ca(root, "server"), _ca(root, "client"), _ca(root, "stranger")
    return {
        "server_ca": server_ca[0],
        "server": _signed(root, "server", server_ca, "DNS:localhost,IP:127.0.0.1"),
        "client_ca": client_ca[0],
        "client": _signed(root, "client", client_ca, None),
        "stranger": _signed(root, "stranger", stranger_ca, None),
    }


@pytest.fixture(scope="module")
def mtls_server(module_server_factory, pki):
    cert, key = pki["server"]
    return module_server_factory("--tls-cert", str(cert), "--tls-key", str(key),
                                 "--tls-client-ca", str(pki["client_ca"]), "--http-port", "0", name="mtls")


def _generate(server, **tls) -> str:
    with Client(server.target, timeout=30, **tls) as client:
        return client.generate("hello world", max_new_tokens=3, ignore_eos=True).text


def test_a_client_with_a_certificate_from_the_client_ca_is_served(mtls_server, pki):
    cert, key = pki["client"]
    with Client(mtls_server.target, timeout=30, tls_ca=str(pki["server_ca"]), tls_cert=str(cert),
                tls_key=str(key)) as client:
        out = client.generate("hello world", max_new_tokens=3, ignore_eos=True)
    assert out.completion_tokens == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("who", ["no certificate", "a stranger's certificate", "plaintext"])
def test_other_clients_are_turned_away(mtls_server, pki, who):
    tls = {"no certificate": {"tls_ca": str(pki["server_ca"])},
           "a stranger's certificate": {"tls_ca": str(pki["server_ca"]), "tls_cert": str(pki["stranger"][0]),
                                        "tls_key": str(pki["stranger"][1])},
           "plaintext": {}}[who]
    with pytest.raises(LoraplexError) as info:
        _generate(mtls_server, **tls)
    assert info.value.code == "UNAVAILABLE", info.value
    assert mtls_server.proc.poll() is None  # the server keeps serving


def test_server_only_tls(module_server_factory, pki):
    cert, key = pki["server"]
    server = module_server_factory("--tls-cert", str(cert), "--tls-key", str(key), name="tls")
    assert _generate(server, tls_ca=str(pki["server_ca"])) is not None
    with pytest.raises(LoraplexError) as info:
        _generate(server)  # plaintext to a TLS port
    assert info.value.code == "UNAVAILABLE"


def test_the_openai_http_port_uses_the_same_tls_and_client_ca(mtls_server, pki):
    import ssl
    import urllib.error
    import urllib.request

    def models(client: tuple[Path, Path] | None) -> int:
        context = ssl.create_default_context(cafile=str(pki["server_ca"]))
        if client is not None:
            context.load_cert_chain(str(client[0]), str(client[1]))
        url = f"https://127.0.0.1:{mtls_server.http_port}/v1/models"
        with urllib.request.urlopen(url, context=context, timeout=30) as resp:
            return resp.status

    assert models(pki["client"]) == 200
    for who in (None, pki["stranger"]):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            models(who)
