"""A job's default display name, from what it runs, for submissions that give none.

``labfleet-batch submit -- python train.py`` becomes ``train``, a ``%%batch``
cell running ``python -m mypkg.fit`` becomes ``mypkg-fit``, a Snakemake
jobscript becomes its rule's name: a person finds the job again on the queue
page and in ``labfleet-batch list`` (every job was ``job`` before). Pure;
the result always passes ``validation.JOB_NAME_PATTERN``.
"""

from __future__ import annotations

import json
import os
import re
import shlex

FALLBACK = "job"
MAX_LENGTH = 32  # validation.JOB_NAME_PATTERN

#: Programs that run the next argument: the name comes from what they run.
RUNNERS = frozenset(
    {
        "env",
        "exec",
        "time",
        "timeout",
        "nice",
        "nohup",
        "stdbuf",
        "mpirun",
        "mpiexec",
        "srun",
        "torchrun",
    }
)
#: Interpreters: the name comes from their script (or ``-m`` module) argument.
INTERPRETER_RE = re.compile(
    r"^(python[0-9.]*|pypy[0-9.]*|ipython[0-9.]*|bash|sh|dash|zsh|ksh|rscript|r|julia|"
    r"perl|ruby|node|octave|matlab|apptainer|singularity)$"
)
SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh"})
#: Shell lines that prepare rather than do the work: a script is named after what follows.
SETUP = frozenset(
    {
        "set", "cd", "pushd", "export", "source", ".", "module", "ml", "conda", "mamba",
        "micromamba", "ulimit", "umask", "echo", "printf", "mkdir", "cp", "mv", "rm", "ln",
        "tar", "date", "hostname", "nvidia-smi", "trap", "unset", "shopt", "true", ":",
    }
)  # fmt: skip
_SEGMENT_SPLIT = re.compile(r"&&|\|\||;|\|")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_NUMBER = re.compile(r"^[0-9][0-9.smhd]*$")


def slug(text: str) -> str:
    """``text`` as a job name: lower case, letters, digits and single dashes, at most 32."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:MAX_LENGTH].strip("-")


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    stem, ext = os.path.splitext(base)
    return stem if stem and ext else base


def name_from_command(argv: list[str] | tuple[str, ...]) -> str:
    """The name of what ``argv`` runs (a slug, maybe ""): its script, module or program."""
    args = list(argv)
    # leading VAR=value words and runners (with their options and numbers: -n 4,
    # timeout 60) hand over to what follows
    while args and (_ASSIGNMENT.match(args[0]) or os.path.basename(args[0]) in RUNNERS):
        args.pop(0)
        while args and (args[0].startswith("-") or _NUMBER.match(args[0])):
            args.pop(0)
    if not args:
        return ""
    program = os.path.basename(args[0])
    if not INTERPRETER_RE.match(program.lower()):
        return slug(_stem(program))
    rest = args[1:]
    for i, arg in enumerate(rest):
        if arg == "-m" and i + 1 < len(rest):
            return slug(rest[i + 1].replace(".", "-"))
        if arg == "-c" and i + 1 < len(rest):
            inner = name_from_script(rest[i + 1]) if program in SHELLS else ""
            return inner or slug(program)
        if arg.startswith("-"):
            continue
        if arg in ("exec", "run"):  # apptainer exec IMAGE cmd ...: the command's name
            continue
        return slug(_stem(arg))
    return slug(program)


def _snakemake_rule(script: str) -> str:
    """Snakemake's jobscripts carry ``# properties = {... "rule": ...}`` on their second line."""
    for line in script.splitlines()[:5]:
        if line.startswith("# properties = "):
            try:
                props = json.loads(line.removeprefix("# properties = "))
            except ValueError:
                return ""
            rule = props.get("rule") if isinstance(props, dict) else None
            return slug(str(rule)) if rule else ""
    return ""


def _commands(script: str):
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for segment in _SEGMENT_SPLIT.split(line):
            try:
                argv = shlex.split(segment, comments=True)
            except ValueError:  # an unbalanced quote: words are good enough for a name
                argv = segment.split()
            if argv:
                yield argv


def name_from_script(script: str) -> str:
    """The name of a shell script's main command (a slug, maybe "")."""
    rule = _snakemake_rule(script)
    if rule:
        return rule
    first = script.lstrip().splitlines()[0] if script.strip() else ""
    if first.startswith("#!"):
        interpreter = name_from_command(first[2:].split())
        if interpreter and interpreter not in SHELLS:
            return interpreter  # not shell code (#!/usr/bin/env python3): its interpreter
    commands = list(_commands(script))
    for argv in commands:
        if os.path.basename(argv[0]) not in SETUP and not all(_ASSIGNMENT.match(a) for a in argv):
            name = name_from_command(argv)
            if name:
                return name
    return name_from_command(commands[0]) if commands else ""


def default_job_name(command: tuple[str, ...] | list[str] = (), script: str | None = None) -> str:
    """What to call a job submitted without a name: from its command or script, else ``job``."""
    name = name_from_script(script) if script is not None else name_from_command(command)
    return name or FALLBACK
