"""A throwaway PKI for the TLS tests (the ``cryptography`` library): a CA, a server certificate for 127.0.0.1 /
localhost, and client certificates, as PEM files."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(d: Path, cn: str = "edgerec test CA") -> tuple[Path, Path]:
    """(ca.pem, ca.key) in ``d``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{cn.replace(' ', '_')}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, d / f"{cn.replace(' ', '_')}.key")
    return d / f"{cn.replace(' ', '_')}.pem", d / f"{cn.replace(' ', '_')}.key"


def issue(ca: tuple[Path, Path], d: Path, cn: str, valid_from: dt.timedelta = dt.timedelta(minutes=-5),
          valid_for: dt.timedelta = dt.timedelta(days=2, minutes=5)) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` for 127.0.0.1 and localhost, good for server and client auth, valid
    from now + ``valid_from`` for ``valid_for``: (cn.pem, cn.key)."""
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + valid_from).not_valid_after(now + valid_from + valid_for)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, d / f"{cn}.key")
    return d / f"{cn}.pem", d / f"{cn}.key"
