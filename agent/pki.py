"""Small PKI helpers: a CA, serving and client certificates, the service-account key. Used by the
local control plane (CA, apiserver serving cert, client certs per user, SA signing key) and by the
fabric emulator (its HTTPS CA). Files are PEM; private keys are written 0600.

Every key is fresh per cluster or emulator and lives only in its (temporary) directory.
`cryptography` is optional (the `demo` extra): importing this module without it raises
`errors.MissingExtra`, which the command line prints as one line naming the extra.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from agent import errors

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ModuleNotFoundError as exc:  # optional: the `demo` extra installs it
    raise errors.MissingExtra(
        "cryptography",
        extra="demo",
        needed_for="the fabric emulator and the local control plane",
    ) from exc


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    ca: KeyPair
    serving: KeyPair
    admin: KeyPair
    scheduler: KeyPair
    sa_private: Path
    sa_public: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(
    directory: Path, cn: str
) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA valid for ten years (state directories are short-lived anyway)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(directory / "ca.crt", directory / "ca.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair, key, cert


def load_or_make_ca(
    directory: Path, cn: str
) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA already in `directory` (`ca.crt`, `ca.key`), or a new one (`make_ca`) when there is
    none or it cannot be read as an EC key and certificate."""
    pair = KeyPair(directory / "ca.crt", directory / "ca.key")
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return make_ca(directory, cn)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc <= _now():
        return make_ca(directory, cn)
    return pair, key, cert


def issue(
    directory: Path,
    stem: str,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    org: str | None = None,
    server_names: tuple[str, ...] = (),
) -> KeyPair:
    """A leaf certificate signed by the CA: a server cert when `server_names` is given (DNS names
    or IP addresses), else a client cert whose CN/O Kubernetes reads as user/group."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        alt: list[x509.GeneralName] = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_cert = make_ca(directory, "cohdi-dev-cluster-ca")
    serving = issue(
        directory,
        "apiserver",
        ca_key=ca_key,
        ca_cert=ca_cert,
        cn="kube-apiserver",
        server_names=(
            "127.0.0.1",
            "localhost",
            "10.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ),
    )
    admin = issue(
        directory, "admin", ca_key=ca_key, ca_cert=ca_cert, cn="admin", org="system:masters"
    )
    # The scheduler authenticates as itself, so RBAC grants it exactly the bootstrap
    # system:kube-scheduler role, as in a real cluster.
    scheduler = issue(
        directory, "scheduler", ca_key=ca_key, ca_cert=ca_cert, cn="system:kube-scheduler"
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_private = directory / "sa.key"
    sa_public = directory / "sa.pub"
    _write_key(sa_private, sa_key)
    sa_public.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(ca, serving, admin, scheduler, sa_private, sa_public)
