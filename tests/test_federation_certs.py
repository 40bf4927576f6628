"""TLS certificates (SAN 127.0.0.1/localhost, signed by the CA) and SuperNode auth keys."""

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from histodd_fed.federation.certs import make_node_keys, make_tls


def test_server_cert_is_signed_by_ca_with_loopback_sans(tmp_path):
    p = make_tls(tmp_path, hosts=["10.0.0.5", "node.example"])
    ca = x509.load_pem_x509_certificate(p["ca"].read_bytes())
    srv = x509.load_pem_x509_certificate(p["cert"].read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "node.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert stat.S_IMODE(p["key"].stat().st_mode) == 0o600


def test_node_keys_are_p384_openssh(tmp_path):
    p = make_node_keys(tmp_path, "C1")
    priv = load_ssh_private_key(p["private"].read_bytes(), password=None)
    pub = load_ssh_public_key(p["public"].read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert stat.S_IMODE(p["private"].stat().st_mode) == 0o600
