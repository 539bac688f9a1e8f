"""TLS certificates for the control plane's etcd traffic between hosts (`mesh certs`).

etcd traffic that leaves a host is encrypted and mutually authenticated, as the mesh's
own traffic is with CURVE: one CA for the cluster, and for each host one certificate
(its address as the subject's IP) that serves as its member's server, peer and client
certificate. The files live in `[control] tls_dir`: `ca.crt`, `HOST.crt`, `HOST.key`;
each host needs the CA's certificate and its own pair (the CA's key, `ca.key`, stays
where the certificates are made).

Made with the `openssl` command (present wherever etcd runs), so the mesh needs no
cryptography package of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DAYS = 3650


class CertError(Exception):
    pass


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("the openssl command is not installed (apt-get install openssl)")
    done = subprocess.run([exe, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")


def make_ca(folder: Path, cluster: str) -> None:
    """The cluster's CA, unless the folder has one already."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.crt").exists():
        return
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(folder / "ca.key"))
    os.chmod(folder / "ca.key", 0o600)
    _openssl("req", "-x509", "-new", "-key", str(folder / "ca.key"), "-sha256", "-days", str(DAYS),
             "-subj", f"/CN=mesh {cluster} control plane CA", "-out", str(folder / "ca.crt"))


def make_host(folder: Path, host: str, address: str) -> None:
    """HOST.crt and HOST.key, signed by the CA: for `address` (and loopback)."""
    key, crt = folder / f"{host}.key", folder / f"{host}.crt"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    os.chmod(key, 0o600)
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "host.csr", Path(tmp) / "host.ext"
        ext.write_text(f"subjectAltName = IP:{address}, IP:127.0.0.1, DNS:localhost\n"
                       "extendedKeyUsage = serverAuth, clientAuth\nkeyUsage = digitalSignature, keyEncipherment\n")
        _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={host}", "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / "ca.crt"), "-CAkey", str(folder / "ca.key"),
                 "-CAcreateserial", "-days", str(DAYS), "-sha256", "-extfile", str(ext), "-out", str(crt))


def make_all(folder: Path, cluster: str, hosts: dict[str, str]) -> list[str]:
    """A CA (if none yet) and a certificate for each host {name: address}; the files made."""
    make_ca(folder, cluster)
    for host, address in hosts.items():
        make_host(folder, host, address)
    return sorted(str(p) for p in folder.iterdir() if p.suffix in (".crt", ".key"))
