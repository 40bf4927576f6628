"""Certificates and keys for a Flower deployment on this machine or a LAN.

- :func:`make_tls` writes a self-signed CA (``ca.crt``) and a SuperLink server certificate
  (``server.pem`` / ``server.key``) whose SAN lists 127.0.0.1, localhost and any extra hosts.
- :func:`make_node_keys` writes one EC P-384 key pair per SuperNode in OpenSSH format
  (``<name>`` private, ``<name>.pub`` public) for ``flwr supernode register`` and
  ``flower-supernode --auth-supernode-private-key``.

Private keys are written with mode 0600 through atomic writes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from histodd_fed.atomic import atomic_write_bytes
from histodd_fed.errors import ConfigError


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "histodd-fed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(out_dir: str | Path, hosts: list[str] | None = None, days: int = 365) -> dict[str, Path]:
    """CA + server certificate for the SuperLink; returns the written paths."""
    out = Path(out_dir)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("histodd-fed CA")).issuer_name(_name("histodd-fed CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for h in hosts or []:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or " " in h:
                raise ConfigError(f"bad host name {h!r} for the server certificate") from None
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder().subject_name(_name("histodd-fed superlink")).issuer_name(ca_cert.subject)
                .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA384()))
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    atomic_write_bytes(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["ca_key"], _key_pem(ca_key), mode=0o600)
    atomic_write_bytes(paths["cert"], srv_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["key"], _key_pem(srv_key), mode=0o600)
    return paths


def make_node_keys(out_dir: str | Path, name: str) -> dict[str, Path]:
    """An EC P-384 SuperNode auth key pair in OpenSSH format (``name`` and ``name.pub``)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad node key name {name!r}")
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    paths = {"private": out / name, "public": out / f"{name}.pub"}
    atomic_write_bytes(paths["private"], priv, mode=0o600)
    atomic_write_bytes(paths["public"], pub + f" histodd-{name}\n".encode())
    return paths
