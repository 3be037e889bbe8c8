"""DEVELOPMENT ONLY: a throw-away CA, a SuperLink TLS certificate and SuperNode authentication keys.

    python -m deploy.dev_certs [--out deploy/certs] [--nodes 3] [--hosts superlink,localhost,127.0.0.1]

Writes ca.crt/ca.key, server.pem/server.key (valid for --hosts), and keys/node<k> (private, OpenSSH
EC P-384) + keys/node<k>.pub for `flower-supernode --auth-supernode-private-key` and
`flwr supernode register`. Never use these files outside a local demo: the CA key sits beside them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 30


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddistill dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Writes `data` to a new file created with its final mode (0600 for a private key: never readable by others, not
    even between writing and a chmod), then renames it over `path`; refuses a `path` that is a link (a planted link
    would otherwise lead the key elsewhere) or anything but a plain file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise SystemExit(f"{path}: is a link or not a plain file; refusing to write a key or certificate there")
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # exactly `mode`, whatever the umask
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate(out: Path, nodes: int, hosts: list[str]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("feddistill dev CA"))
        .issuer_name(_name("feddistill dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    for k in range(1, nodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(
            out / "keys" / f"node{k}",
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True,
        )
        _write(
            out / "keys" / f"node{k}.pub",
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "deploy" / "certs")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--hosts", default="superlink,localhost,127.0.0.1", help="names/IPs the SuperLink answers on")
    args = parser.parse_args()
    generate(args.out, args.nodes, [h.strip() for h in args.hosts.split(",") if h.strip()])
    print(f"development certificates and node keys written to {args.out} (valid {VALID_DAYS} days; not for production)")


if __name__ == "__main__":
    main()
