"""Test certificates (TLS) and SuperNode authentication keys for a Flower deployment, with ``cryptography``.

    python -m celora.fl.flower.certs OUT_DIR [--nodes 3] [--host 127.0.0.1 --host localhost]

writes ``ca.crt`` (root of trust for SuperNodes and ``flwr``), ``server.pem`` + ``server.key``
(SuperLink; SANs = the given hosts), and per node ``node_<i>`` (OpenSSH EC P-384 private key, for
``flower-supernode --auth-supernode-private-key``) + ``node_<i>.pub`` (for ``flwr supernode register``).
For tests and trials only: a production CA keeps its key offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_tls(folder: str | Path, hosts: list[str] | None = None, days: int = 30) -> TlsFiles:
    """A self-signed CA and a SuperLink server certificate (EC P-384) valid for ``hosts``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    hosts = hosts or ["127.0.0.1", "localhost", "::1"]
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "celora test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, out / "ca.key")
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, files.server_key)
    return files


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: (private key file, ``.pub`` file)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = out / name
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    priv.chmod(0o600)
    pub = out / f"{name}.pub"
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return priv, pub


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m celora.fl.flower.certs", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write into")
    ap.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to create (node_0 … node_{n-1})")
    ap.add_argument("--host", action="append", help="SAN of the SuperLink certificate (repeatable)")
    args = ap.parse_args(argv)
    files = make_tls(args.out, args.host)
    keys = [make_node_key(args.out, f"node_{i}") for i in range(args.nodes)]
    print(f"CA {files.ca_cert}; SuperLink {files.server_cert} + {files.server_key}; {len(keys)} SuperNode key pairs")


if __name__ == "__main__":
    main()
