"""Throw-away PKI and kubeconfig of the test cluster (openssl on PATH).

Loaded by cluster.py from its folder. Everything is valid for 30 days and
for 127.0.0.1 only; nothing here is fit for a real cluster.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import yaml


class PkiError(RuntimeError):
    """openssl is missing or failed."""


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise PkiError("'openssl' not found on PATH (needed to create test certificates)")
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed ({r.returncode}): {r.stderr.strip()}")


def make_pki(pki: Path, extra_dns: tuple[str, ...] = ()) -> None:
    """CA, a serving/client certificate for 127.0.0.1 (+ ``extra_dns``), a service-account
    key, and the front-proxy CA and client certificate for API aggregation."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "30",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=labfleet-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )
    (pki / "server.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc"
        + "".join(f",DNS:{name}" for name in extra_dns)
        + "\n"
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=pki,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        "server.ext",
        cwd=pki,
    )
    _make_front_proxy_pki(pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for f in pki.iterdir():
        if f.suffix == ".key":
            f.chmod(0o600)


#: Client certificate name the aggregator presents to aggregated API servers.
FRONT_PROXY_CLIENT = "front-proxy-client"


def _make_front_proxy_pki(pki: Path) -> None:
    """A separate CA and client certificate for API aggregation (request-header auth).

    kube-apiserver proxies requests to aggregated APIs (Kueue's visibility
    API) with this certificate and X-Remote-User/Group headers; the
    aggregated server trusts the headers only from a certificate signed by
    ``front-proxy-ca`` with an allowed name. A separate CA, as kubeadm does,
    so no ordinary client certificate can assert identities through headers.
    """
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
        "-keyout", "front-proxy-ca.key", "-out", "front-proxy-ca.crt",
        "-subj", "/CN=labfleet-front-proxy-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )  # fmt: skip
    (pki / "front-proxy-client.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes",
        "-keyout", "front-proxy-client.key", "-out", "front-proxy-client.csr",
        "-subj", f"/CN={FRONT_PROXY_CLIENT}",
        cwd=pki,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "front-proxy-client.csr",
        "-CA", "front-proxy-ca.crt", "-CAkey", "front-proxy-ca.key", "-CAcreateserial",
        "-out", "front-proxy-client.crt", "-days", "30", "-sha256",
        "-extfile", "front-proxy-client.ext",
        cwd=pki,
    )  # fmt: skip


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "labfleet-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "labfleet-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": "labfleet-test",
                "context": {"cluster": "labfleet-test", "user": "labfleet-admin"},
            }
        ],
        "current-context": "labfleet-test",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
