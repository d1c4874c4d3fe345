"""The hub's look for the services' own pages: JupyterHub's ``page.html`` and stylesheet.

The batch and accounting services render their pages with the hub's own
template, so they carry the hub's navigation bar (logo, Home, Token, Admin for
hub admins, the Services menu, the dark-mode toggle, the user's name and
Logout) and load the hub's stylesheet and scripts from where the hub serves
them (``<hub prefix>static/``, the same origin behind the proxy). Bootstrap
classes, the ``data-bs-theme`` attribute set by the hub's ``darkmode.js`` and
the theme it stores in the browser are then shared with the hub's pages.

The hub computes its Services menu from its own configuration, which a
service cannot read without extra API scopes; each service is told which
services to list (``BatchService.hub_services``, ``AccountingApp.hub_services``,
filled in by :mod:`labfleet_hub.configurer` with the services it starts).

Pure apart from reading the templates (once, on first use): no environment
reads. Both services import it; it imports nothing of theirs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: Our template, in this package's ``templates`` folder (next to the hub's login page).
TEMPLATE = "labfleet-service.html"


@dataclass(frozen=True)
class HubNav:
    """Where the hub is, as a service sees it (``HubAuth.hub_prefix``), and its menu."""

    hub_prefix: str = "/hub/"  # the hub's pages: /hub/home, /hub/static/...
    services: tuple[str, ...] = ()  # names listed under Services, in this order

    @property
    def base_url(self) -> str:
        """JupyterHub's base URL (``/`` by default): the prefix of ``services/<name>/``."""
        prefix = self.hub_prefix if self.hub_prefix.endswith("/") else self.hub_prefix + "/"
        return prefix.removesuffix("hub/") or "/"

    def static_url(self, path: str, include_version: bool = True) -> str:
        return f"{self.hub_prefix.rstrip('/')}/static/{path.lstrip('/')}"

    def service_href(self, name: str) -> str:
        return f"{self.base_url}services/{name}/"

    @classmethod
    def from_hub_auth(cls, hub_auth, services: Iterable[str] = ()) -> HubNav:
        prefix = getattr(hub_auth, "hub_prefix", "") or "/hub/"
        return cls(hub_prefix=prefix, services=tuple(services))


@functools.cache
def _environment():
    import jinja2
    from jupyterhub._data import DATA_FILES_PATH

    ours = Path(str(resources.files(__package__).joinpath("templates")))
    hubs = Path(DATA_FILES_PATH) / "templates"
    loader = jinja2.ChoiceLoader(
        [
            jinja2.FileSystemLoader(str(ours)),
            # as in the hub: its own templates under "templates/" (login.html extends it so)
            jinja2.PrefixLoader({"templates": jinja2.FileSystemLoader(str(hubs))}),
        ]
    )
    return jinja2.Environment(loader=loader, autoescape=True)


def _user(model: Mapping[str, Any] | None):
    if not model or not model.get("name"):
        return None
    name = str(model["name"])
    # what page.html reads of the hub's User: name, and the name as the inside of a JSON
    # string, put into a <script> unescaped: no "<", ">" or "&" may stay as they are
    escaped = json.dumps(name)[1:-1]
    for char, code in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        escaped = escaped.replace(char, code)
    return SimpleNamespace(name=name, json_escaped_name=escaped)


def render_service_page(
    nav: HubNav,
    user: Mapping[str, Any] | None,
    title: str,
    body: str,
    *,
    refresh: int | None = None,
    head: str = "",
) -> str:
    """The whole page: the hub's ``page.html`` around ``body``.

    ``user``: the hub's user model (``name``, ``admin``) of the signed-in user, or
    None (a Login button instead). ``body`` and ``head`` are HTML the caller has
    escaped already; ``title`` is text. ``refresh``: reload every so many seconds.
    """
    import markupsafe

    parsed_scopes = {"admin-ui"} if user and user.get("admin") else set()
    services = [SimpleNamespace(name=n, href=nav.service_href(n)) for n in nav.services]
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            title=title,
            body=markupsafe.Markup(body),
            head=markupsafe.Markup(head),
            refresh=refresh,
            # page.html's namespace, as the hub's BaseHandler.template_namespace fills it
            base_url=nav.hub_prefix,
            prefix=nav.base_url,
            user=_user(user),
            login_url=f"{nav.hub_prefix}login",
            logout_url=f"{nav.hub_prefix}logout",
            static_url=nav.static_url,
            version_hash="",
            services=services,
            parsed_scopes=parsed_scopes,
            no_spawner_check=True,  # no spawner here: page.html would ask for its options form
            announcement=None,
            logo_url="",
        )
    )
