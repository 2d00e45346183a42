"""Federation PKI: a self-signed CA, TLS certificates per party, Ed25519 identity keys.

Everything comes from pyca/cryptography (X.509 per RFC 5280, ECDSA P-256 for TLS keys, Ed25519
per RFC 8032 for site identity keys).  Time and validity are arguments so tests can pin them.

Certificates:

- CA: ``CN=<federation> federation CA``, ``BasicConstraints(ca=True, path_length=0)``,
  ``KeyUsage(key_cert_sign, crl_sign)``.
- Aggregator: ``CN=aggregator``, ``O=<federation>``, SANs for the given host names / IP
  addresses, ``ExtendedKeyUsage(serverAuth)``.
- Site: ``CN=<site id>``, ``O=<federation>``, ``OU=site``, ``ExtendedKeyUsage(clientAuth)``.
  The aggregator binds the gRPC peer's certificate CN to the site id in every request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedbrats.errors import ConfigError, FedbratsError

AGGREGATOR_CN = "aggregator"


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, PEM-encoded (PKCS#8 key, unencrypted)."""

    cert_pem: bytes
    key_pem: bytes


def _name(cn: str, federation: str | None = None, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if federation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation))
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_ca(federation: str, *, now: dt.datetime, days: int = 3650) -> CertKey:
    """A self-signed federation CA (ECDSA P-256, SHA-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{federation} federation CA", federation)
    cert = (_builder(name, name, key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return CertKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(ca: CertKey, subject: x509.Name, *, server: bool, sans: list[str], now: dt.datetime,
           days: int) -> CertKey:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    b = (_builder(subject, ca_cert.subject, key.public_key(), now, days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=True, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return CertKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca: CertKey, federation: str, hosts: list[str], *, now: dt.datetime,
                      days: int = 825) -> CertKey:
    """The aggregator's TLS server certificate, with SANs for ``hosts`` (DNS names or IPs)."""
    return _issue(ca, _name(AGGREGATOR_CN, federation, "aggregator"), server=True,
                  sans=list(dict.fromkeys([*hosts, AGGREGATOR_CN])), now=now, days=days)


def issue_site_cert(ca: CertKey, federation: str, site: str, *, now: dt.datetime,
                    days: int = 825) -> CertKey:
    """A site's TLS client certificate; its subject CN is the site id."""
    return _issue(ca, _name(site, federation, "site"), server=False, sans=[], now=now, days=days)


def ed25519_identity() -> tuple[bytes, bytes]:
    """A new Ed25519 identity key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return _key_pem(key), pub


def cert_common_name(cert_pem: bytes) -> str:
    """Subject CN of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, hex."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def write_private(path: Path, data: bytes) -> None:
    """Write a private key file with mode 0600 from creation (never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def read_pem(path: str | Path, what: str, *, private: bool = False) -> bytes:
    """Read a PEM file named by config field ``what``.

    Args:
        private: the file holds a private key: refuse it when group or others can read it
            (as OpenSSH does), since anyone who can read it can impersonate this party.

    Raises:
        ConfigError: the file is missing, is not PEM, or (private) is readable by others.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"{what}: cannot read: {exc.strerror or exc}"]) from None
    if b"-----BEGIN" not in data:
        raise ConfigError(str(p), [f"{what}: not a PEM file"])
    if private:
        check_private_mode(p, what)
    return data


def check_private_mode(path: Path, what: str) -> None:
    """Refuse a private key file that group or others may read (mode must be 0600 or stricter).

    Raises:
        ConfigError: names the file, its mode and the fix.
    """
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(str(path), [f"{what}: private key file is readable by others (mode "
                                      f"{mode:04o}); run `chmod 600 {path}`"])


def check_key_matches_cert(cert_pem: bytes, key_pem: bytes, where: str) -> None:
    """Refuse a TLS key that is not the certificate's (a handshake would fail obscurely).

    Raises:
        ConfigError: the key does not belong to the certificate, or either does not parse.
    """
    try:
        cert_pub = x509.load_pem_x509_certificate(cert_pem).public_key()
        key_pub = serialization.load_pem_private_key(key_pem, password=None).public_key()
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, [f"tls.cert / tls.key: cannot parse ({exc})"]) from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert_pub.public_bytes(*fmt) != key_pub.public_bytes(*fmt):
        raise ConfigError(where, ["tls.key is not the private key of tls.cert"])
