"""Development certificates: the server certificate chains to the CA and names the hosts; node keys load."""

from __future__ import annotations

import ipaddress

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
