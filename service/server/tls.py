"""TLS for the gRPC ports: server certificates, and mutual TLS when a client CA is configured."""

from __future__ import annotations

from pathlib import Path

import grpc

from personalize.errors import InvalidArgument


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials from PEM files: `cert` (chain) and `key`; with `client_ca`, callers must present a
    certificate signed by it (mutual TLS)."""
    if not cert or not key:
        raise InvalidArgument("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
        ca = Path(client_ca).read_bytes() if client_ca else None
    except OSError as exc:
        raise InvalidArgument(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def bind(server: grpc.Server, address: str, cert: str = "", key: str = "", client_ca: str = "") -> int:
    """Listen on `address` (TLS when a certificate is configured); returns the port. OSError if it is taken."""
    if client_ca and not cert:
        raise InvalidArgument("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
    try:
        if cert or key:
            return server.add_secure_port(address, server_credentials(cert, key, client_ca))
        return server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address"
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not local") from exc


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client credentials from PEM files: trust `ca`; with `cert` and `key`, present that certificate
    (for servers that require mutual TLS)."""
    if bool(cert) != bool(key):
        raise InvalidArgument(
            "a client certificate (--upstream-cert) needs its private key (--upstream-key), and the other way round"
        )
    if (cert or key) and not ca:
        raise InvalidArgument("--upstream-cert needs --upstream-ca (the CA that signed the workers' certificates)")
    try:
        root = Path(ca).read_bytes()
        pair = (Path(key).read_bytes(), Path(cert).read_bytes()) if cert else (None, None)
    except OSError as exc:
        raise InvalidArgument(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_channel_credentials(root, *pair)
