"""Keep tokens and secrets out of logs.

OAuthenticator and tornado may format whole token responses into error
messages. :class:`RedactingFilter`, installed on the hub's log handlers,
rewrites any record that carries a token-shaped value before it is written.
"""

from __future__ import annotations

import logging
import re

_SECRET_KEYS = r"access_token|refresh_token|id_token|client_secret|code_verifier|password"
# "access_token": "abc"  /  'refresh_token': 'abc'  /  access_token=abc
_PATTERNS = [
    re.compile(rf"""(["']?(?:{_SECRET_KEYS})["']?\s*[:=]\s*["']?)([^"'&\s,}}]+)""", re.I),
    re.compile(r"(Bearer\s+)([A-Za-z0-9._~+/=-]+)", re.I),
    # a bare JWT anywhere
    re.compile(r"()(eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+)"),
]
MASK = "[redacted]"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with token values and the given literal secrets masked."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that masks token values in the formatted message."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix here
            return True
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # exception text is formatted later from exc_info: pre-format it redacted
            record.exc_text = redact(
                logging.Formatter().formatException(record.exc_info), self.secrets
            )
            record.exc_info = None
        return True


def install(logger: logging.Logger, secrets: tuple[str, ...] = ()) -> RedactingFilter:
    """Attach one RedactingFilter to ``logger`` and all its handlers (idempotent)."""
    for existing in logger.filters:
        if isinstance(existing, RedactingFilter):
            existing.secrets = tuple(set(existing.secrets) | {s for s in secrets if s})
            return existing
    flt = RedactingFilter(secrets)
    logger.addFilter(flt)
    for handler in logger.handlers:
        handler.addFilter(flt)
    return flt
