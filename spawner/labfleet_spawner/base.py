"""What every labfleet spawner shares: the catalogue, the form, the server-side check.

:class:`CatalogueSpawnerMixin` is mixed into the local and the Kubernetes
spawner. It renders the spawn form from the profiles the user's hub groups
allow, and validates every request -- from the form *and* from the REST API --
in ``apply_user_options`` before anything is started. A rejected request
raises ``HTTPError(400)`` with a message naming the bad field and the allowed
values; ``start()`` never runs for it.
"""

from __future__ import annotations

import os

from tornado import web
from traitlets import Any, Dict, Enum, HasTraits, Instance, List, Unicode, default

from .catalogue import Catalogue, Selection, SelectionError, load_catalogue, validate_selection
from .form import UNAVAILABLE_MODES, options_from_form, render_form

_CATALOGUES: dict[tuple[str, float], Catalogue] = {}


def cached_catalogue(path: str) -> Catalogue:
    """Load a catalogue once per (path, modification time): edits are picked up."""
    key = (os.path.abspath(path), os.stat(path).st_mtime)
    if key not in _CATALOGUES:
        _CATALOGUES.clear()
        _CATALOGUES[key] = load_catalogue(path)
    return _CATALOGUES[key]


class CatalogueSpawnerMixin(HasTraits):
    """Catalogue-driven profiles for a JupyterHub spawner (mix in before the spawner)."""

    catalogue_path = Unicode(
        "",
        config=True,
        help="""Path of the profile catalogue YAML file (images, sizes, accelerators, profiles).

        The file is re-read when it changes; an invalid file makes spawns fail
        with a message naming the file, the entry and the field.
        """,
    )

    catalogue_data = Instance(
        Catalogue,
        allow_none=True,
        help="An already-parsed catalogue; wins over catalogue_path (tests, embedding).",
    ).tag(config=True)

    extra_group_env = Dict(
        {},
        config=True,
        help="Extra environment variables for members of a hub group: {group: {VAR: value}}.",
    )

    selection = Instance(Selection, allow_none=True, help="The validated selection of this spawn.")

    accounting_group_exclude = List(
        Unicode(),
        ["users"],
        config=True,
        help="""Umbrella groups never charged for a session when the user has another.

        See :func:`labfleet_spawner.objects.accounting_group` for the whole rule.
        """,
    )

    budget_db_url = Unicode(
        "",
        config=True,
        help="""SQLAlchemy URL of the accounting ledger; when set, GPU sessions are
        checked against the charged group's GPU-hour budget before anything starts
        (refused at 100% when the budget is enforced, a warning from its threshold).
        """,
    )

    budget_checker = Any(
        None,
        allow_none=True,
        help="An object with check_budget(group, accelerator_kind) -> Decision (tests, embedding).",
    )

    budget_message = Unicode("", help="The budget warning of this spawn, if any.")

    unavailable_profiles = Enum(
        UNAVAILABLE_MODES,
        "collapse",
        config=True,
        help="""What the spawn form does with profiles whose accelerator has no device on
        this machine (local spawner) or cluster (Kubernetes, nodes the user's groups may
        use): ``collapse`` lists them after the others, disabled, in a closed "Not
        available here" section; ``hide`` leaves them out. Profiles that can run here
        always come first. Requests are still checked on the server either way.
        """,
    )

    @property
    def catalogue(self) -> Catalogue:
        if self.catalogue_data is not None:
            return self.catalogue_data
        if not self.catalogue_path:
            raise RuntimeError(f"{type(self).__name__}.catalogue_path is not configured")
        return cached_catalogue(self.catalogue_path)

    def charged_group(self) -> str:
        """The group this session is accounted (and budgeted) to; one rule everywhere."""
        from .objects import accounting_group

        if self.selection is None:
            return ""
        return accounting_group(
            self.selection, self.user_group_names(), self.accounting_group_exclude
        )

    def _budget_checker(self):
        if self.budget_checker is None and self.budget_db_url:
            from labfleet_accounting.budgets import BudgetChecker
            from labfleet_accounting.db import make_engine

            self.budget_checker = BudgetChecker(make_engine(self.budget_db_url))
        return self.budget_checker

    def check_budget(self) -> None:
        """Refuse (HTTP 403) a GPU session whose group has spent its GPU-hour budget."""
        checker = self._budget_checker()
        if checker is None or self.selection is None:
            return
        accelerator = self.selection.accelerator
        try:
            decision = checker.check_budget(
                self.charged_group(), accelerator.kind if accelerator else ""
            )
        except Exception as e:
            # an unreachable ledger must not stop every spawn: allow, loudly
            self.log.error("GPU budget check failed for %s, allowing: %s", self._log_name, e)
            return
        if not decision.allowed:
            self.log.warning("Refused spawn for %s: %s", self._log_name, decision.message)
            raise web.HTTPError(403, f"Refused: {decision.message}", reason="GPU budget exhausted")
        if decision.verdict == "warn":
            self.budget_message = decision.message

    def user_group_names(self) -> list[str]:
        """The hub groups of the user, as synced by the authenticator at login and refresh."""
        return sorted(g.name for g in getattr(self.user, "groups", []) or [])

    def availability(self) -> dict[str, tuple[int, int]]:
        """Free/total per accelerator name for the form; spawners override. Must not block."""
        return {}

    # -- form ---------------------------------------------------------------

    def offered(self):
        from .catalogue import offered_profiles

        return offered_profiles(self.catalogue, self.user_group_names())

    @default("options_form")
    def _labfleet_options_form(self):
        # A callable: rendered per request with the user's groups and fresh availability.
        return lambda spawner: spawner.render_options_form()

    def render_options_form(self, message: str = "") -> str:
        return render_form(self.offered(), self.availability(), message, self.unavailable_profiles)

    @default("options_from_form")
    def _labfleet_options_from_form(self):
        return self._read_and_check_form

    def _read_and_check_form(self, formdata):
        options = options_from_form(formdata)
        # Checked here for a friendly message on the form page; checked again
        # in apply_user_options, which also covers the REST API.
        validate_selection(self.catalogue, self.user_group_names(), options)
        return options

    # -- the authoritative check --------------------------------------------

    @default("apply_user_options")
    def _labfleet_apply_user_options(self):
        return lambda spawner, user_options: spawner.apply_selection(user_options)

    def apply_selection(self, user_options) -> Selection:
        """Validate ``user_options``, keep the selection; HTTP 400 if anything is not offered."""
        try:
            self.selection = validate_selection(
                self.catalogue, self.user_group_names(), dict(user_options or {})
            )
        except SelectionError as e:
            self.log.warning("Rejected spawn options for %s: %s", self._log_name, e)
            raise web.HTTPError(400, f"Rejected: {e}", reason="Invalid profile choice") from None
        self.check_budget()
        return self.selection

    def selection_env(self) -> dict[str, str]:
        """Environment describing the selection, for code inside the notebook."""
        sel = self.selection
        env = {
            "LABFLEET_PROFILE": sel.profile.name,
            "LABFLEET_IMAGE": sel.image.name,
            "LABFLEET_SIZE": sel.size.name,
            "LABFLEET_GROUPS": ",".join(self.user_group_names()),
        }
        if sel.accelerator:
            env["LABFLEET_ACCELERATOR"] = sel.accelerator.name
            env["LABFLEET_ACCELERATOR_COUNT"] = str(sel.count)
        for group in self.user_group_names():
            env.update(self.extra_group_env.get(group, {}))
        return env
