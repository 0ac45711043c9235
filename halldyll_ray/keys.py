"""API keys: generation, parsing and the keyed hash that is all the database ever stores.

A key looks like ``hr_<16 hex>_<43 url-safe characters>``. The first part (``hr_<16 hex>``)
is the public prefix: unique, stored in clear, used to find the key's row and safe to show
in listings and logs. The whole key carries 256 random bits after the prefix, so a fast keyed
hash (HMAC-SHA256 under the server's key secret) is the right storage: no password-style
stretching is needed against brute force, and verification costs microseconds per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PATTERN = re.compile(r"(hr_[0-9a-f]{16})_([A-Za-z0-9_-]{43})")


def generate_key() -> tuple[str, str]:
    """A new (prefix, full key)."""
    prefix = "hr_" + secrets.token_hex(8)
    return prefix, f"{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(key: str) -> str | None:
    """The public prefix of a well-formed key, or None for anything else."""
    match = KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
    return match[1] if match else None


def hash_key(secret: bytes, key: str) -> bytes:
    return hmac.new(secret, key.encode(), hashlib.sha256).digest()


def verify_key(secret: bytes, key: str, stored: bytes) -> bool:
    """Constant-time comparison of the key's hash with the stored one."""
    return hmac.compare_digest(hash_key(secret, key), bytes(stored))


def principal_proof(secret: bytes, fields: str, issued_at: int) -> str:
    """``"<issued_at>.<hex HMAC-SHA256 of fields and issued_at>"``, under the key secret."""
    mac = hmac.new(secret, f"principal|{issued_at}|{fields}".encode(), hashlib.sha256)
    return f"{issued_at}.{mac.hexdigest()}"


def check_principal_proof(
    secret: bytes, fields: str, proof: str, *, now: int, max_age_s: int
) -> bool:
    """Whether ``proof`` was made by :func:`principal_proof` for ``fields`` at most
    ``max_age_s`` seconds ago (constant-time comparison)."""
    stamp, _, _mac = proof.partition(".")
    if not stamp.isdigit() or not 0 <= now - int(stamp) <= max_age_s:
        return False
    return hmac.compare_digest(principal_proof(secret, fields, int(stamp)), proof)
