"""Why a login is refused, and whom to ask: a pure builder and the 403 that carries it.

JupyterHub's own refusal is one generic sentence, shown twice (as the heading
and as the text). A person refused by labfleet is told, once, on the hub's
error page (``templates/error.html``): that they are not in a group allowed
here, which groups are (named as the identity provider names them, e.g.
``ai-infn/users``), which groups they are in, and whom to ask
(``IAMAuthenticator.refusal_contact``).
"""

from __future__ import annotations

import html
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


class LoginExpired(web.HTTPError):
    """HTTP 401: the identity provider's token can no longer be refreshed; log in again.

    Shown instead of JupyterHub 6.1's 500 (``'SpawnHandler' object has no attribute
    '_token_authenticated'``) to a person whose browser session outlived their
    access token (an identity provider that gives no refresh token, or one that
    refused it). The page links to the login, which comes back to ``next_url``.
    """

    REASON = "Sign-in expired"

    def __init__(self, username: str, login_service: str, login_url: str):
        text = (
            f"The sign-in of {username} with {login_service} has expired and cannot be "
            "renewed without you. Please log in again."
        )
        super().__init__(401, log_message=text.replace("%", "%%"), reason=self.REASON)
        self.text = text
        # no plain message: the spawn form and the error page then show the HTML one
        self.jupyterhub_message = ""
        self.login_url = login_url
        self.jupyterhub_html_message = (
            f'<span class="lead" id="labfleet-login-expired">{html.escape(text)}</span><br>'
            f'<a class="btn btn-primary mt-3" id="labfleet-login-again" '
            f'href="{html.escape(login_url, quote=True)}">Log in again</a>'
        )


class SubjectMismatch(web.HTTPError):
    """HTTP 403: the hub user belongs to another identity-provider account (``sub``).

    JupyterHub lowercases names, so IAM's ``Alice`` and ``alice`` are one hub
    user; and a renamed or recreated IAM account reuses a name with a new
    ``sub``. The first login binds the name to its ``sub``
    (:mod:`labfleet_hub.subject_binding`); any other account is told so here.
    """

    REASON = "Account mismatch"

    def __init__(self, username: str, login_name: str, sub: str, contact: str = ""):
        whom = contact.strip() or "the platform's administrators"
        text = (
            f"The hub user {username} belongs to another identity-provider account: "
            f"the account {login_name!r} you signed in with (subject {sub}) cannot use it "
            "(hub user names ignore case, and a renamed or recreated account is a new one). "
            f"If this is your account, ask {whom} to move it to your new sign-in."
        )
        super().__init__(403, log_message=text.replace("%", "%%"), reason=self.REASON)
        self.jupyterhub_message = text
        self.username, self.login_name, self.sub = username, login_name, sub
