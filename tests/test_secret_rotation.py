"""A certificate renewed in a Kubernetes Secret reaches hubproxy without a restart.

The kubelet mounts a Secret as a directory of symbolic links: `tls.crt -> ..data/tls.crt`,
`..data -> ..<timestamp>/`. An update writes a new timestamped directory and swaps `..data` to
it with one rename (its "atomic writer"), so the files' own paths never change. This is what
zero-to-jupyterhub's `proxy.https.type: secret` mounts at /etc/chp/tls (cert-manager renews
such a Secret), recreated here on disk, swap included.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import trustme

from support import Backend, Proxy


class SecretVolume:
    """A directory laid out as the kubelet lays out a mounted Secret."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, files: dict[str, bytes]) -> None:
        """A new version: a fresh timestamped directory, `..data` swapped to it at once."""
        self.generation += 1
        version = f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        (self.root / version).mkdir()
        for name, data in files.items():
            (self.root / version / name).write_bytes(data)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        (self.root / "..data_tmp").symlink_to(version)
        os.rename(self.root / "..data_tmp", self.root / "..data")  # the one atomic step
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(old)


def served_certificate(port: int, keep: list[ssl.SSLSocket] | None = None) -> bytes:
    """The DER certificate a new handshake gets (the connection is kept in `keep` if given)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="hub.example.org")
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    if keep is None:
        tls.close()
    else:
        keep.append(tls)
    return der


def get_on(tls: ssl.SSLSocket, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: hub.example.org\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(65536)
        assert chunk, "connection closed"
        head += chunk
    return head.split(b"\r\n", 1)[0]


def pair(ca: trustme.CA) -> tuple[dict[str, bytes], bytes]:
    leaf = ca.issue_cert("hub.example.org")
    files = {
        "tls.key": leaf.private_key_pem.bytes(),
        "tls.crt": b"".join(pem.bytes() for pem in leaf.cert_chain_pems),
    }
    return files, ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def test_renewed_secret_is_served_without_a_restart(
    start_proxy: Callable[..., Proxy], backend: Backend, tmp_path: Path
) -> None:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path / "tls")
    first, first_der = pair(ca)
    volume.write(first)
    proxy = start_proxy(
        "--default-target", backend.url,
        "--ssl-key", str(volume.root / "tls.key"), "--ssl-cert", str(volume.root / "tls.crt"),
    )  # fmt: skip
    kept: list[ssl.SSLSocket] = []
    assert served_certificate(proxy.port, kept) == first_der

    second, second_der = pair(ca)
    volume.write(second)
    proxy.wait_for_line(r"info: Reloaded TLS certificate for the proxy listener")
    assert served_certificate(proxy.port) == second_der
    # the connection made before the renewal carries on, with the certificate it started with
    assert get_on(kept[0], "/any") == b"HTTP/1.1 200 OK"
    assert kept[0].getpeercert(binary_form=True) == first_der
    kept[0].close()
    assert proxy.proc.poll() is None and "Traceback" not in proxy.output()
