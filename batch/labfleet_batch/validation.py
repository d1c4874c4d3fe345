"""Every check on a batch submission, in one place, before anything is created.

:func:`validate_request` turns the JSON a user sent into a :class:`BatchRequest`
plus a catalogue :class:`~labfleet_spawner.catalogue.Selection`, or raises
:class:`RequestError` naming the field, what was wrong and what is allowed.
It is pure: no cluster, no filesystem, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labfleet_hub.contract import is_valid_group_name
from labfleet_spawner.catalogue import (
    Catalogue,
    Selection,
    SelectionError,
    offered_profiles,
    validate_selection,
)

from .names import default_job_name

#: A job's display name: becomes part of the Job name, so DNS-label characters only.
JOB_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
_JOB_NAME_RE = re.compile(JOB_NAME_PATTERN)
#: Input file names: one path component, no hidden files, nothing a shell expands.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$"
_FILE_NAME_RE = re.compile(FILE_NAME_PATTERN)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
#: Variables the platform sets itself; a user may not override them.
RESERVED_ENV_PREFIXES = ("LABFLEET_", "JUPYTERHUB_", "KUBERNETES_", "JOB_COMPLETION_INDEX")
#: Variables that choose which accelerators a process sees: set by the platform from what
#: it handed out; a job that set them could reach every GPU of its node past its quota.
DEVICE_ENV_NAMES = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")

FIELDS = (
    "name",
    "command",
    "script",
    "files",
    "env",
    "group",
    "profile",
    "image",
    "size",
    "count",
    "accelerator",
    "completions",
    "parallelism",
    "max_run_time",
    "priority",
    "offload",
)


class RequestError(ValueError):
    """A submission was refused; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class Limits:
    """What one submission may ask for (configured on the service)."""

    # Script and files travel inside the Job object (one atomic create, no
    # ConfigMap to clean up). Linux caps one argument/environment string at
    # 128 KiB (MAX_ARG_STRLEN), so stay well under it.
    max_script_bytes: int = 64 * 1024
    max_files: int = 16
    max_files_bytes: int = 64 * 1024
    max_command_args: int = 64
    max_arg_bytes: int = 4096
    max_env: int = 32
    max_env_value_bytes: int = 4096
    max_completions: int = 1000
    max_parallelism: int = 100
    min_run_time: int = 10
    max_run_time: int = 7 * 24 * 3600
    default_run_time: int = 24 * 3600
    #: jobs one user may have waiting (queued) at once, in all groups; 0: no cap
    max_waiting_per_user: int = 100
    #: jobs one group may have waiting (queued) at once, all its users together; 0: no cap
    max_waiting_per_group: int = 500


@dataclass(frozen=True)
class BatchRequest:
    """A validated submission: only values that passed every check."""

    group: str
    selection: Selection
    name: str = "job"
    command: tuple[str, ...] = ()
    script: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    completions: int = 1
    parallelism: int = 1
    max_run_time: int = 3600
    priority: str = "normal"
    offload: bool = False
    #: The submitter's hub groups it was checked with (they decide which profiles are
    #: offered): what a restarted local backend checks a waiting job against again.
    user_groups: tuple[str, ...] = ()

    def __hash__(self):
        return hash((self.group, self.name, self.command, self.script))


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _int(raw: Any, name: str, low: int, high: int, default: int) -> int:
    if raw is None:
        return default
    # strict: a JSON number without a fraction ("5", 5.0, true and Infinity are refused)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise RequestError(
            f"{name} {str(raw)[:32]!r} is not a whole number; allowed: {low} to {high}"
        )
    value = raw
    if not low <= value <= high:
        raise RequestError(f"{name} {value} is out of range; allowed: {low} to {high}")
    return value


def _str(raw: Any, name: str) -> str:
    if not isinstance(raw, str):
        raise RequestError(f"{name} must be a string, not {type(raw).__name__}")
    return raw


def _command(raw: Any, limits: Limits) -> tuple[str, ...]:
    if isinstance(raw, str):
        raise RequestError(
            'command must be a list of arguments, e.g. ["python", "train.py"]; '
            "send shell code as script instead"
        )
    if not isinstance(raw, list) or not raw:
        raise RequestError("command must be a non-empty list of strings")
    if len(raw) > limits.max_command_args:
        raise RequestError(
            f"command has {len(raw)} arguments; allowed: at most {limits.max_command_args}"
        )
    for index, arg in enumerate(raw):
        if not isinstance(arg, str):
            raise RequestError(f"command[{index}] must be a string")
        if _utf8_len(arg) > limits.max_arg_bytes or "\x00" in arg:
            raise RequestError(
                f"command[{index}] is too long or contains NUL; allowed: at most "
                f"{limits.max_arg_bytes} bytes, no NUL"
            )
    return tuple(raw)


def _script(raw: Any, limits: Limits) -> str:
    script = _str(raw, "script")
    if not script.strip():
        raise RequestError("script is empty; send shell code, or a command list")
    size = _utf8_len(script)
    if size > limits.max_script_bytes:
        raise RequestError(
            f"script is {size} bytes; allowed: at most {limits.max_script_bytes} bytes "
            "(put large code in your home directory and run it from a short script)"
        )
    if "\x00" in script:
        raise RequestError("script contains a NUL byte; allowed: text only")
    return script


def _files(raw: Any, limits: Limits) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RequestError("files must be an object {file name: text content}")
    if len(raw) > limits.max_files:
        raise RequestError(f"{len(raw)} input files; allowed: at most {limits.max_files}")
    total = 0
    for name, content in raw.items():
        if not _FILE_NAME_RE.fullmatch(name) or ".." in name:
            raise RequestError(
                f"input file name {str(name)[:64]!r} is not allowed; allowed: letters, digits, "
                ". _ - (no leading dot or dash, no directories), at most 100 characters"
            )
        if not isinstance(content, str):
            raise RequestError(f"input file {name!r} must be text (a string)")
        total += _utf8_len(content)
    if total > limits.max_files_bytes:
        raise RequestError(
            f"input files total {total} bytes; allowed: at most {limits.max_files_bytes} bytes "
            "(put large inputs on the shared filesystem)"
        )
    return dict(raw)


def _env(raw: Any, limits: Limits) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RequestError("env must be an object {NAME: value}")
    if len(raw) > limits.max_env:
        raise RequestError(f"{len(raw)} environment variables; allowed: at most {limits.max_env}")
    for name, value in raw.items():
        if not _ENV_NAME_RE.fullmatch(name):
            raise RequestError(
                f"environment variable name {str(name)[:64]!r} is not allowed; allowed: "
                "letters, digits and _, not starting with a digit"
            )
        if name.upper() in DEVICE_ENV_NAMES:
            raise RequestError(
                f"environment variable {name!r} is not allowed: the platform sets "
                f"{', '.join(DEVICE_ENV_NAMES)} from the accelerators it gives the job; "
                "ask for accelerators with accelerator and count"
            )
        if name.upper().startswith(RESERVED_ENV_PREFIXES):
            raise RequestError(
                f"environment variable {name!r} is reserved; names starting with "
                f"{', '.join(RESERVED_ENV_PREFIXES)} are set by the platform"
            )
        if not isinstance(value, str) or _utf8_len(value) > limits.max_env_value_bytes:
            raise RequestError(
                f"environment variable {name!r} must be a string of at most "
                f"{limits.max_env_value_bytes} bytes"
            )
    return dict(raw)


def _pick_group(raw: Any, user_groups: Iterable[str], queue_groups: Iterable[str]) -> str:
    usable = sorted(set(user_groups) & set(queue_groups))
    if raw is None:
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise RequestError(
                "you belong to no group with a batch queue; groups with queues: "
                f"{', '.join(sorted(queue_groups)) or '(none)'}"
            )
        raise RequestError(f"group is required; allowed: {', '.join(usable)}")
    group = _str(raw, "group")
    if not is_valid_group_name(group) or group not in usable:
        raise RequestError(
            f"group {group[:64]!r} is not one of your groups with a batch queue; "
            f"allowed: {', '.join(usable) or '(none)'}"
        )
    return group


def _profile_for_accelerator(catalogue: Catalogue, groups, accelerator: str) -> str:
    """The first profile offered to ``groups`` that uses ``accelerator`` (``--gpu a100``)."""
    offered = offered_profiles(catalogue, groups)
    for choice in offered:
        if choice.accelerator is not None and choice.accelerator.name == accelerator:
            return choice.profile.name
    names = sorted({c.accelerator.name for c in offered if c.accelerator is not None})
    raise RequestError(
        f"accelerator {accelerator[:64]!r} is not available to you; "
        f"allowed: {', '.join(names) or '(none)'}"
    )


def validate_request(
    raw: Any,
    *,
    catalogue: Catalogue,
    user_groups: Iterable[str],
    queue_groups: Mapping[str, Iterable[str]],
    priorities: Iterable[str],
    default_priority: str = "normal",
    offload_available: bool = False,
    limits: Limits | None = None,
) -> BatchRequest:
    """Check a submission. ``queue_groups`` maps each group with a queue to the
    catalogue accelerators its quota covers. Raises :class:`RequestError`."""
    limits = limits or Limits()
    if not isinstance(raw, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(map(str, raw)) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    user_groups = sorted(user_groups)
    group = _pick_group(raw.get("group"), user_groups, queue_groups)

    name = raw.get("name") or ""  # none given: named after its command, below
    if name and (not isinstance(name, str) or not _JOB_NAME_RE.fullmatch(name)):
        raise RequestError(
            f"name {str(name)[:64]!r} is not allowed; allowed: lower-case letters, digits "
            "and -, starting and ending with a letter or digit, at most 32 characters"
        )

    has_command, has_script = raw.get("command") is not None, raw.get("script") is not None
    if has_command == has_script:
        raise RequestError("send exactly one of command (a list of arguments) or script (text)")
    command = _command(raw["command"], limits) if has_command else ()
    script = _script(raw["script"], limits) if has_script else None
    # unnamed: called after what it runs (train.py -> "train"), so a person finds it again
    name = name or default_job_name(command, script)

    options = {k: raw[k] for k in ("profile", "image", "size", "count") if raw.get(k) is not None}
    accelerator = raw.get("accelerator")
    if accelerator is not None:
        accelerator = _str(accelerator, "accelerator")
        if "profile" not in options:
            options["profile"] = _profile_for_accelerator(catalogue, user_groups, accelerator)
    try:
        selection = validate_selection(catalogue, user_groups, options)
    except SelectionError as e:
        raise RequestError(str(e)) from None
    if accelerator is not None and (
        selection.accelerator is None or selection.accelerator.name != accelerator
    ):
        raise RequestError(
            f"profile {selection.profile.name!r} does not use accelerator {accelerator!r}; "
            "leave out one of profile or accelerator"
        )
    if selection.accelerator is not None:
        covered = set(queue_groups[group])
        if selection.accelerator.name not in covered:
            raise RequestError(
                f"group {group!r} has no batch quota for {selection.accelerator.name}; "
                f"its queue covers: {', '.join(sorted(covered)) or 'CPU only'}"
            )

    completions = _int(raw.get("completions"), "completions", 1, limits.max_completions, 1)
    parallelism = _int(
        raw.get("parallelism"),
        "parallelism",
        1,
        min(completions, limits.max_parallelism),
        1,
    )
    max_run_time = _int(
        raw.get("max_run_time"),
        "max_run_time (seconds)",
        limits.min_run_time,
        limits.max_run_time,
        limits.default_run_time,
    )
    priorities = list(priorities)
    priority = raw.get("priority") or default_priority
    if priority not in priorities:
        raise RequestError(
            f"priority {str(priority)[:32]!r} is not defined; allowed: {', '.join(priorities)}"
        )
    offload = raw.get("offload", False)
    if not isinstance(offload, bool):
        raise RequestError("offload must be true or false")
    if offload and not offload_available:
        raise RequestError("offload is not available on this platform; allowed: false")
    if offload and selection.accelerator is not None:
        raise RequestError(
            "offload runs CPU profiles only; choose a profile without accelerator or offload=false"
        )

    return BatchRequest(
        group=group,
        selection=selection,
        name=name,
        command=command,
        script=script,
        files=_files(raw.get("files"), limits),
        env=_env(raw.get("env"), limits),
        completions=completions,
        parallelism=parallelism,
        max_run_time=max_run_time,
        priority=priority,
        offload=offload,
        user_groups=tuple(user_groups),
    )


def request_fields(request: BatchRequest) -> dict[str, Any]:
    """The submission that :func:`validate_request` turns back into ``request``.

    Every default is written out as it was resolved at submit time (profile,
    image, size, run time, priority): checked again against a changed
    configuration, a choice that is gone is refused by name instead of being
    resolved to something else.
    """
    sel = request.selection
    fields: dict[str, Any] = {
        "name": request.name,
        "group": request.group,
        "profile": sel.profile.name,
        "image": sel.image.name,
        "size": sel.size.name,
        "completions": request.completions,
        "parallelism": request.parallelism,
        "max_run_time": request.max_run_time,
        "priority": request.priority,
        "offload": request.offload,
    }
    if request.script is not None:
        fields["script"] = request.script
    else:
        fields["command"] = list(request.command)
    if sel.accelerator is not None:
        fields["accelerator"] = sel.accelerator.name
        fields["count"] = sel.count
    if request.files:
        fields["files"] = dict(request.files)
    if request.env:
        fields["env"] = dict(request.env)
    return fields
