"""Bearer tokens for weight pushes and state-changing endpoints, compared in constant time."""
from __future__ import annotations

import hmac

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
