"""Development certificates: the server certificate chains to the CA and names the hosts; node keys load."""

from __future__ import annotations

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy.dev_certs import generate


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    generate(tmp_path, nodes=2, hosts=["superlink", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0


def test_node_keys_are_openssh_ec_pairs(tmp_path):
    generate(tmp_path, nodes=3, hosts=["localhost"])
    for k in (1, 2, 3):
        private = load_ssh_private_key((tmp_path / "keys" / f"node{k}").read_bytes(), password=None)
        public = load_ssh_public_key((tmp_path / "keys" / f"node{k}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()


def test_private_keys_are_0600_from_their_first_byte(tmp_path, monkeypatch, reliability):
    created: dict[str, int] = {}
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs) -> int:  # the mode of each file when it is created, still empty
        fd = real_open(path, flags, mode, *args, **kwargs)
        created[os.path.basename(path)] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)  # a permissive umask must not matter
    try:
        generate(tmp_path, nodes=1, hosts=["localhost"])
    finally:
        os.umask(old)
    private = {name: mode for name, mode in created.items()
               if name.startswith((".ca.key.", ".server.key.", ".node1.")) and ".pub." not in name}
    assert len(private) == 3 and set(private.values()) == {0o600}, created
    for name in ("ca.key", "server.key", "keys/node1"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) == 0o644
    reliability("Deployment", "dev_certs writes private keys under umask 000",
                "each key file is created 0600 while still empty, written, then renamed into place")


def test_a_link_planted_at_a_key_path_is_refused(tmp_path, reliability):
    target = tmp_path / "elsewhere"
    target.write_text("not yours")
    tmp_path.joinpath("out").mkdir()
    (tmp_path / "out" / "ca.key").symlink_to(target)
    with pytest.raises(SystemExit, match="is a link or not a plain file"):
        generate(tmp_path / "out", nodes=1, hosts=["localhost"])
    assert target.read_text() == "not yours"
    reliability("Deployment", "a symlink planted at ca.key before dev_certs runs", "refused; the link's target untouched")
