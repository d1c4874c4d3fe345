"""Why a login is refused, and whom to ask: a pure builder and the 403 that carries it.

JupyterHub's own refusal is one generic sentence, shown twice (as the heading
and as the text). A person refused by labfleet is told, once, on the hub's
error page (``templates/error.html``): that they are not in a group allowed
here, which groups are (named as the identity provider names them, e.g.
``ai-infn/users``), which groups they are in, and whom to ask
(``IAMAuthenticator.refusal_contact``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tornado import web

REASON = "Not allowed on this platform"
_EMAIL = re.compile(r"^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")
_URL = re.compile(r"^https?://[^\s<>\"']+$")


@dataclass(frozen=True)
class Refusal:
    """What a refused person is told. Group names as the identity provider spells them."""

    username: str
    allowed_groups: tuple[str, ...]
    user_groups: tuple[str, ...]
    contact: str = ""
    #: True when a logged-in user lost their allowed group (checked again before a spawn)
    no_longer: bool = False

    @property
    def contact_href(self) -> str:
        """A link for the contact (``mailto:`` or the URL itself), or "" for plain text."""
        if _EMAIL.match(self.contact):
            return f"mailto:{self.contact}"
        if _URL.match(self.contact):
            return self.contact
        return ""

    @property
    def reason(self) -> str:
        verb = "is no longer a member of" if self.no_longer else "is not in"
        return f"{self.username} {verb} a group allowed on this platform"

    def text(self) -> str:
        """The whole explanation as one plain sentence (logs, API clients, tests)."""
        allowed = ", ".join(self.allowed_groups) or "none"
        mine = ", ".join(self.user_groups) or "none"
        whom = self.contact or "the platform's administrators"
        return (
            f"{self.reason} (allowed: {allowed}; your groups: {mine}). "
            f"To get access, ask {whom} to add you to one of the allowed groups."
        )


def claimed_groups(claims: Mapping, claim_keys: Iterable[str]) -> tuple[str, ...]:
    """The groups the identity provider sent, as it names them (``/`` prefix dropped)."""
    found: dict[str, None] = {}
    for key in claim_keys:
        values = claims.get(key) or []
        for value in [values] if isinstance(values, str) else values:
            if isinstance(value, str) and value.strip("/"):
                found.setdefault(value.lstrip("/"), None)
    return tuple(found)


def login_refusal(
    username: str,
    claims: Mapping,
    claim_keys: Iterable[str],
    allowed_groups: Iterable[str],
    group_prefix: str = "",
    contact: str = "",
    no_longer: bool = False,
) -> Refusal:
    """The refusal for ``username``: allowed hub groups shown with the IAM prefix put back."""
    return Refusal(
        username=username,
        allowed_groups=tuple(f"{group_prefix}{g}" for g in sorted(allowed_groups)),
        user_groups=claimed_groups(claims, claim_keys),
        contact=contact.strip(),
        no_longer=no_longer,
    )


class LoginRefused(web.HTTPError):
    """HTTP 403 whose error page explains the refusal (see ``templates/error.html``)."""

    def __init__(self, refusal: Refusal):
        super().__init__(403, log_message=refusal.text(), reason=REASON)
        self.refusal = refusal
        # the error page's plain message, for a template that does not know the refusal
        self.jupyterhub_message = refusal.text()
