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


def render_form(
    choices: list[ProfileChoice],
    availability: dict[str, tuple[int, int]] | None = None,
    message: str = "",
) -> str:
    """HTML for the profile choices; ``availability`` maps accelerator name to (free, total)."""
    selected = next((c.profile.name for c in choices if c.profile.default), None)
    if selected is None and choices:
        selected = choices[0].profile.name
    return (
        _environment()
        .get_template("spawn_form.html")
        .render(
            choices=choices, availability=availability or {}, selected=selected, message=message
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
