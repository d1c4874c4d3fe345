"""What the local backend keeps of a waiting job so that a restarted service can queue it again.

A job that waits for quota or a device has nothing on disk but its folder;
without its request a restart would have to fail it. So while it waits, its
store row (``extra["request"]``) holds its request, and :func:`requeue` turns
that back into a :class:`~.validation.BatchRequest` when the service starts.

What is stored is the *submission* (:func:`~.validation.request_fields`, the
inverse of :func:`~.validation.validate_request`), not the validated objects,
and it is checked again by the same :func:`~.validation.validate_request`
against the catalogue, queue configuration and limits the restarted service
runs with. A pickled or field-by-field copy of the ``BatchRequest`` would
start the job with a profile, size or accelerator the new configuration may
no longer have; checking again refuses what is gone, by name, with the very
messages a new submission would get. Defaults are stored as they were
resolved at submit time, so the job that starts is the one whose profile and
accelerator its status showed, not a new default.

Not checked again: the submitter's group membership, which the backend cannot
ask the hub for; the groups stored with the request are the ones the hub gave
at submit time (as for a job that was already running).

The request holds the user's script, files and environment: it is kept only
while the job waits (dropped from the row when it starts), in the store's
0600 file, and never logged.
"""

from __future__ import annotations

from typing import Any

from labfleet_spawner.catalogue import Catalogue

from .queues import QueueConfig
from .validation import BatchRequest, Limits, RequestError, request_fields, validate_request

#: The message of a waiting job whose row has no request (written before requests were
#: stored, or by a service without a catalogue to check them against).
NOT_STORED = "the batch service restarted before this job started; submit again"


def stored_request(request: BatchRequest) -> dict[str, Any]:
    """What a store row keeps of a waiting job's request (plain JSON)."""
    return {"fields": request_fields(request), "user_groups": list(request.user_groups)}


def requeue(
    stored: Any,
    *,
    catalogue: Catalogue | None,
    config: QueueConfig,
    limits: Limits | None,
    group: str,
) -> tuple[BatchRequest | None, str]:
    """The request of a job that waited when the service stopped, checked again.

    Returns ``(request, "")``, or ``(None, why)`` with a message for the job's
    owner: nothing stored, or what the current configuration no longer offers.
    """
    if not stored:
        return None, NOT_STORED
    if catalogue is None:
        return None, f"{NOT_STORED} (the service had no catalogue to check it against)"
    try:
        fields, user_groups = stored["fields"], stored.get("user_groups") or [group]
        request = validate_request(
            fields,
            catalogue=catalogue,
            user_groups=user_groups,
            # what the service offers a submitter: every group with a queue that they are in
            # (validate_request keeps only those among user_groups, as Policy.can_submit does)
            queue_groups=config.covered_accelerators(),
            priorities=config.priorities,
            default_priority=config.default_priority,
            offload_available=config.offload_enabled,
            limits=limits,
        )
    except RequestError as e:
        return None, (
            f"the batch service restarted with a changed configuration and this waiting job "
            f"no longer passes its checks: {e}; submit again"
        )
    except (KeyError, TypeError, AttributeError):
        return None, f"{NOT_STORED} (its stored request is unreadable)"
    if request.group != group:  # a row edited by hand: never move a job to another group
        return None, f"{NOT_STORED} (its stored request is for another group)"
    return request, ""
