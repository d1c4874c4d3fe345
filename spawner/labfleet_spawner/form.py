"""The spawn form: render what a user may choose, read back what they chose.

Both functions are pure. Reading the form only picks the fields of the chosen
profile; whether those values are allowed is decided later, on the server, by
:func:`labfleet_spawner.catalogue.validate_selection` -- the form is a
convenience, never a check.
"""

from __future__ import annotations

from functools import cache

import jinja2

from .catalogue import ProfileChoice

_FIELDS = ("image", "size", "count")
#: Longest value accepted from any form field; longer input is a forged form.
MAX_FIELD_LENGTH = 128


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("labfleet_spawner", "templates"),
        autoescape=True,
    )


#: What the form can do with profiles whose accelerator has no device here at all.
UNAVAILABLE_MODES = ("collapse", "hide")


def split_by_presence(
    choices: list[ProfileChoice], availability: dict[str, tuple[int, int]]
) -> tuple[list[ProfileChoice], list[ProfileChoice]]:
    """(profiles this machine or cluster can run, profiles whose accelerator it has none of).

    "None of" means a total of 0 in ``availability``; a profile without an
    accelerator, or whose accelerator has no entry (availability unknown), is
    runnable. Catalogue order is kept within each list.
    """
    here, absent = [], []
    for choice in choices:
        counts = availability.get(choice.accelerator.name) if choice.accelerator else None
        (absent if counts is not None and counts[1] == 0 else here).append(choice)
    return here, absent


def render_form(
    choices: list[ProfileChoice],
    availability: dict[str, tuple[int, int]] | None = None,
    message: str = "",
    unavailable: str = "collapse",
) -> str:
    """HTML for the profile choices; ``availability`` maps accelerator name to (free, total).

    Profiles whose accelerator has no device here come after the others, in a
    closed ``<details>`` section (``unavailable="collapse"``), or not at all
    (``"hide"``); see :func:`split_by_presence`.
    """
    if unavailable not in UNAVAILABLE_MODES:
        raise ValueError(f"unavailable must be one of {', '.join(UNAVAILABLE_MODES)}")
    availability = availability or {}
    here, absent = split_by_presence(choices, availability)
    # the catalogue's default if it can run here, else the first that can
    selected = next((c.profile.name for c in here if c.profile.default), None)
    if selected is None and here:
        selected = here[0].profile.name
    return (
        _environment()
        .get_template("spawn_form.html")
        .render(
            choices=here,
            absent=absent if unavailable == "collapse" else [],
            availability=availability,
            selected=selected,
            message=message,
        )
    )


def options_from_form(formdata: dict[str, list[str]]) -> dict[str, str]:
    """Raw options from a submitted form: ``profile`` plus that profile's fields."""

    def first(key):
        values = formdata.get(key) or [""]
        value = str(values[0]).strip()
        if len(value) > MAX_FIELD_LENGTH:
            raise ValueError(
                f"form field {key[:40]!r} is longer than {MAX_FIELD_LENGTH} characters"
            )
        return value

    profile = first("profile")
    options = {"profile": profile} if profile else {}
    for field in _FIELDS:
        value = first(f"{profile}.{field}") if profile else ""
        if value:
            options[field] = value
    return options
