"""Bearer tokens for weight pushes and state-changing endpoints (constant-time compare); TLS credentials."""
from __future__ import annotations

import hmac
from pathlib import Path

from .config import AuthSettings


class AuthError(PermissionError):
    pass


def require_token(settings: AuthSettings) -> str:
    token = settings.resolve_token()
    if not token:
        raise SystemExit("a token is required for weight sync: set auth.token_file (or MMUPT_AUTH__TOKEN_FILE) "
                         "or auth.token (MMUPT_AUTH__TOKEN)")
    return token


def bearer_ok(header_value: str | None, token: str) -> bool:
    """True if `header_value` is `Bearer <token>`; constant-time in the token's bytes."""
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[len("Bearer "):].encode(), token.encode())


def server_credentials(settings: AuthSettings):
    """TLS credentials for the WeightSync server (cert + key), or None to serve in plaintext."""
    import grpc

    if not settings.tls_cert_file:
        return None
    key, cert = Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(settings: AuthSettings):
    """TLS credentials trusting tls_ca_file for the learner's channels, or None for plaintext."""
    import grpc

    if not settings.tls_ca_file:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_ca_file).read_bytes())
