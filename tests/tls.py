"""Certificates made in the test: a CA, a server certificate for 127.0.0.1 and localhost, client
certificates, and one from a CA nobody trusts. Written as PEM files, as operators configure TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class KeyPair:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Certificates:
    """PEM files under one directory."""

    ca_file: Path
    server: KeyPair
    client: KeyPair
    stranger: KeyPair
    """A client certificate signed by another CA: mutual TLS must refuse it."""
    stranger_ca_file: Path

    def server_env(self, *, require_client_cert: bool = False) -> dict[str, str]:
        """What a service process is configured with (``TAKEOFF_TLS__*``)."""
        return {
            "TAKEOFF_TLS__CERT_FILE": str(self.server.cert_file),
            "TAKEOFF_TLS__KEY_FILE": str(self.server.key_file),
            "TAKEOFF_TLS__CA_FILE": str(self.ca_file),
            "TAKEOFF_TLS__REQUIRE_CLIENT_CERT": "true" if require_client_cert else "false",
        }


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Takeoff tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _leaf(
    common_name: str,
    authority: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = authority
    key = ec.generate_private_key(ec.SECP256R1())
    # A service presents its own certificate when it calls the others under mutual TLS: both usages.
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(name) for name in SERVER_NAMES),
                    *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS),
                ]
            ),
            critical=False,
        )
    return key, _validity(builder).sign(ca_key, hashes.SHA256())


def _pair(
    directory: Path,
    stem: str,
    authority: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    server: bool,
) -> KeyPair:
    key, cert = _leaf(f"takeoff-test-{stem}", authority, server=server)
    pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_cert(cert, pair.cert_file)
    _write_key(key, pair.key_file)
    return pair


def make_certificates(directory: Path) -> Certificates:
    """A CA and the certificates it signs (plus a stranger's), as PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = _authority("Takeoff test CA")
    stranger_authority = _authority("Someone else's CA")
    ca_file = directory / "ca.crt"
    _write_cert(authority[1], ca_file)
    stranger_ca_file = directory / "stranger-ca.crt"
    _write_cert(stranger_authority[1], stranger_ca_file)
    return Certificates(
        ca_file=ca_file,
        server=_pair(directory, "server", authority, server=True),
        client=_pair(directory, "client", authority, server=False),
        stranger=_pair(directory, "stranger", stranger_authority, server=False),
        stranger_ca_file=stranger_ca_file,
    )
