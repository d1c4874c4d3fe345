"""The group quota page (``quotas?group=<g>``), in the hub's layout. Pure: HTML from data.

The same page in both modes: the group's quotas with the platform admin's caps,
a form for those who may change them (group and platform admins) and the same
table read-only for the group's other members, and the audit log of the
group's changes: when, who, what, before and after. Every value from a
request or the database is escaped here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from html import escape

from labfleet_hub.service_page import HubNav, render_service_page

RUNNING_NOTE = (
    "Changes take effect at once. Running jobs are never stopped by a lowered limit: they "
    "finish, and the group's waiting jobs start once it is under the new limit again."
)


def _key(entry: Mapping) -> str:
    return f"{entry.get('flavor')}/{entry.get('resource')}"


def describe_change(before: Iterable[Mapping] | Mapping, after: Iterable[Mapping] | Mapping) -> str:
    """``labfleet-a100/nvidia.com/gpu: 1 → 0`` for what differs (quotas or caps)."""

    def flat(entries) -> dict[str, str]:
        if isinstance(entries, Mapping):  # caps: {"flavor/resource": {"max_nominal", ...}}
            return {k: ", ".join(f"{n} {v}" for n, v in sorted(c.items()))
                    for k, c in entries.items()}  # fmt: skip
        out = {}
        for e in entries or ():
            text = str(e.get("nominalQuota", ""))
            if "borrowingLimit" in e:
                text += f" (borrowing {e['borrowingLimit']})"
            out[_key(e)] = text
        return out

    old, new = flat(before), flat(after)
    parts = [
        f"{k}: {old.get(k, '(none)')} → {new.get(k, '(none)')}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(parts) or "no change"


def _row(i: int, q: Mapping, editable: bool, local: bool) -> str:
    cap = q.get("cap")
    can = editable and cap is not None
    disabled = "" if can else " disabled"
    cells = [
        f"<td>{escape(str(q['flavor']))}</td><td>{escape(str(q['resource']))}</td>",
        f'<td><input class="form-control form-control-sm" aria-label="limit of '
        f'{escape(_key(q))}" name="nominal-{i}" value="{escape(str(q["nominalQuota"]))}"'
        f"{disabled}></td>",
        f"<td>{escape(str(cap['max_nominal'])) if cap else 'no cap'}</td>",
    ]
    if local:
        over = q.get("over")
        note = ' <span class="badge bg-warning text-dark">above the limit</span>' if over else ""
        cells.append(f'<td class="in-use">{escape(str(q.get("in_use", "0")))}{note}</td>')
        cells.append(f"<td>{escape(str(q.get('configured') or '-'))}</td>")
    else:
        cells.append(
            f'<td><input class="form-control form-control-sm" name="borrowing-{i}" '
            f'value="{escape(str(q.get("borrowingLimit", "")))}"{disabled}></td>'
            f"<td>{escape(str(cap['max_borrowing'])) if cap else '-'}</td>"
        )
    cls = ' class="table-warning"' if q.get("over") else ""
    return f'<tr{cls} data-entry="{escape(_key(q))}">{"".join(cells)}</tr>'


def render_quota_page(
    nav: HubNav,
    user: Mapping,
    state: Mapping,
    audit: Iterable[Mapping],
    *,
    editable: bool,
    local: bool,
    xsrf: str,
    message: str = "",
) -> str:
    group = str(state["group"])
    quotas = list(state["quotas"])
    head = "<th>flavor</th><th>resource</th><th>limit</th><th>cap</th>"
    head += (
        "<th>in use</th><th>in the YAML</th>"
        if local
        else ("<th>borrowing limit</th><th>borrowing cap</th>")
    )
    rows = "".join(_row(i, q, editable, local) for i, q in enumerate(quotas))
    who = (
        "You may change these limits within the caps a platform admin set."
        if editable
        else f"Read only: only admins of group {group} and platform admins change these."
    )
    over = [q for q in quotas if q.get("over")]
    warning = ""
    if over:
        names = ", ".join(_key(q) for q in over)
        warning = (
            f'<div class="alert alert-warning" id="over-limit">The group\'s running jobs hold '
            f"more than its limit of {escape(names)}: they are not stopped; its waiting jobs "
            "wait until it is under the limit again.</div>"
        )
    flash = (
        f'<div class="alert alert-success" id="message">{escape(message)}</div>'
        if (message)
        else ""
    )
    button = '<button type="submit" class="btn btn-primary">Save</button>' if editable else ""
    entries = []
    for e in audit:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        entries.append(
            f"<tr><td>{when}</td><td>{escape(str(e['actor']))}</td>"
            f"<td>{escape(str(e['action']))}</td>"
            f"<td>{escape(describe_change(e.get('before', []), e.get('after', [])))}</td></tr>"
        )
    body = f"""<div class="container" id="quota-page">
<h1>Batch quotas of {escape(group)}</h1>
<p id="where">{escape(str(state.get("where", "")))}. <span id="rights">{escape(who)}</span></p>
<p id="running-note">{escape(RUNNING_NOTE)}</p>
{flash}{warning}
<form method="post"><input type="hidden" name="_xsrf" value="{escape(xsrf)}">
<table class="table table-sm" id="quotas"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>
</table>{button}</form>
<h2>Changes</h2>
<table class="table table-sm" id="audit"><thead><tr><th>when (UTC)</th><th>who</th><th>what</th>
<th>before → after</th></tr></thead><tbody>{"".join(entries)}</tbody></table>
</div>"""
    return render_service_page(nav, user, f"{group} quotas", body)
