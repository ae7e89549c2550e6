"""Self-signed CA, SuperLink server certificate and SuperNode auth keys (tests and pilots).

Production sites use certificates from their own PKI; these helpers make a throwaway
set with the `cryptography` package (a Flower dependency), no openssl needed:

    python -m fedfms_jax.deploy.tls OUT_DIR [--host superlink.example.org] [--nodes 3]

writes ca.crt, server.pem, server.key (SAN: localhost, 127.0.0.1 and --host) and, per
hospital i, node_i and node_i.pub (an EC key pair in OpenSSH format, as `ssh-keygen -t
ecdsa` makes): the key pair Flower's SuperNode authentication uses.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_certificates(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                      days: int = 30) -> dict[str, Path]:
    """CA + server certificate for `hosts`; returns {"ca": .., "cert": .., "key": ..}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedfms test CA")).issuer_name(_name("fedfms test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(key))
    paths["key"].chmod(0o600)
    return paths


def make_node_keys(out: Path, name: str) -> tuple[Path, Path]:
    """EC key pair for SuperNode authentication: (private PEM, public OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedfms_jax.deploy.tls", description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--host", action="append", default=[], help="extra DNS name / IP of the SuperLink")
    ap.add_argument("--nodes", type=int, default=0, help="SuperNode auth key pairs to make")
    ap.add_argument("--days", type=int, default=365)
    a = ap.parse_args(argv)
    if (Path(a.out) / "ca.crt").exists():  # new ones would invalidate what the hospitals hold
        print(f"{Path(a.out) / 'ca.crt'} exists: the SuperLink's certificate and the nodes' keys come from it; "
              "make new ones in another folder", file=sys.stderr)
        return 2
    paths = make_certificates(Path(a.out), ("localhost", "127.0.0.1", *a.host), days=a.days)
    for i in range(a.nodes):
        make_node_keys(Path(a.out), f"node_{i}")
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
