"""Notebook client of the batch service: Python API, ``%%batch`` cell magic, CLI.

Authentication is the notebook's own hub token (``JUPYTERHUB_API_TOKEN``);
the service URL comes from ``LABFLEET_BATCH_URL`` (set by the spawner, e.g.
``http://127.0.0.1:8000/services/batch/``). Standard library only, so it
works in any singleuser image.

Python::

    from labfleet_batch.client import BatchClient
    c = BatchClient()
    job = c.submit(script="python train.py", accelerator="a100", group="ml")
    c.wait(job["id"])                 # prints queue position and state changes
    print(c.logs(job["id"], index=0))

IPython (``%load_ext labfleet_batch.client``)::

    %%batch --gpu a100 --group ml --wait
    python train.py

CLI (and Snakemake: ``--cluster "labfleet-batch submit --group ml"
--cluster-status "labfleet-batch status"``)::

    labfleet-batch submit --group ml --gpu t4 job.sh      # prints only the job id
    labfleet-batch status ml/job-x1y2z3w4                 # running | success | failed
                                                          # (and why it failed, on stderr)
    labfleet-batch wait|logs|cancel <id>; labfleet-batch list
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

FINAL = ("succeeded", "failed", "cancelled")

#: What makes "the notebook's software" findable: a job gets these from the place it
#: was submitted from (a cell, a terminal), so what works there works as a job.
INHERITED_ENV = ("PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONPATH")


def software_env(
    environ: dict[str, str] | None = None, executable: str | None = None
) -> dict[str, str]:
    """The submitting environment's software settings, for the job's ``env``.

    The running interpreter's folder goes first on ``PATH``: a kernel started from
    a virtualenv may not have it on ``PATH`` at all, yet ``python`` in the job must
    be that interpreter.
    """
    environ = os.environ if environ is None else environ
    executable = sys.executable if executable is None else executable
    env = {k: environ[k] for k in INHERITED_ENV if environ.get(k)}
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p]
    if executable and os.path.isabs(executable):
        bindir = os.path.dirname(executable)
        path = [bindir, *(p for p in path if p != bindir)]
    env["PATH"] = os.pathsep.join(path)
    return env


class BatchError(Exception):
    """The service refused or failed; ``message`` is the service's explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


def describe(job: dict) -> str:
    """One line for a person: state, and queue position while waiting."""
    state = job.get("state", "?")
    queue = job.get("queue") or {}
    if state == "queued":
        pos, total = queue.get("position"), queue.get("pending_in_queue")
        where = f"position {pos}" + (f" of {total}" if total else "") if pos else "waiting"
        why = queue.get("message") or queue.get("reason") or ""
        return f"{job['id']}: queued, {where}" + (f" ({why[:120]})" if why else "")
    if state == "running":
        done = job.get("succeeded", 0)
        return f"{job['id']}: running, {done}/{job.get('completions', 1)} completions done"
    message = job.get("message") or ""
    return f"{job['id']}: {state}" + (f" ({message[:200]})" if message else "")


class BatchClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        url = url or os.environ.get("LABFLEET_BATCH_URL")
        if not url:
            raise BatchError(0, "no batch service URL: set LABFLEET_BATCH_URL or pass url=")
        token = token or os.environ.get("JUPYTERHUB_API_TOKEN")
        if not token:
            raise BatchError(0, "no hub token: set JUPYTERHUB_API_TOKEN or pass token=")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any = None, query: dict | None = None):
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw).get("message") or e.reason
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:500] or str(e.reason)
            raise BatchError(e.code, message) from None
        except urllib.error.URLError as e:
            raise BatchError(
                0, f"cannot reach the batch service at {self.url}: {e.reason}"
            ) from None

    def _json(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        with self._open(method, path, body, query) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _job_path(job_id: str) -> str:
        group, sep, name = job_id.partition("/")
        if not sep or not group or not name:
            raise BatchError(0, f"job id {job_id!r} is not of the form <group>/<name>")
        return f"api/jobs/{urllib.parse.quote(group)}/{urllib.parse.quote(name)}"

    # -- API ---------------------------------------------------------------------------

    def info(self) -> dict:
        return self._json("GET", "api/info")

    def submit(
        self,
        command: list[str] | None = None,
        script: str | None = None,
        inherit_env: bool = True,
        **fields,
    ) -> dict:
        """Submit; ``fields`` as the service's (group, accelerator, profile, files, ...).

        With ``inherit_env`` (the default) the job runs with this process's software
        environment (:data:`INHERITED_ENV`); variables given in ``env`` win.
        """
        body = {k: v for k, v in fields.items() if v is not None}
        if inherit_env:
            body["env"] = {**software_env(), **(body.get("env") or {})}
        if command is not None:
            body["command"] = list(command)
        if script is not None:
            body["script"] = script
        return self._json("POST", "api/jobs", body)

    def list(self, group: str | None = None) -> list[dict]:
        return self._json("GET", "api/jobs", query={"group": group} if group else None)["jobs"]

    def status(self, job_id: str) -> dict:
        return self._json("GET", self._job_path(job_id))

    def logs(self, job_id: str, index: int = 0) -> str:
        with self._open("GET", self._job_path(job_id) + "/logs", query={"index": index}) as r:
            return r.read().decode(errors="replace")

    def follow_logs(self, job_id: str, index: int = 0) -> Iterator[str]:
        """Log text as it is written, until the job ends (streamed by the service)."""
        with self._open(
            "GET", self._job_path(job_id) + "/logs", query={"index": index, "follow": 1}
        ) as r:
            while chunk := r.read1(65536) if hasattr(r, "read1") else r.read(65536):
                yield chunk.decode(errors="replace")

    def cancel(self, job_id: str) -> dict:
        return self._json("DELETE", self._job_path(job_id))

    def wait(
        self,
        job_id: str,
        poll: float = 2.0,
        timeout: float | None = None,
        progress: Callable[[str], None] | None = print,
    ) -> dict:
        """Poll until the job ends; report each change of state or queue position."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.status(job_id)
            line = describe(job)
            if progress and line != last:
                progress(line)
                last = line
            if job["state"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)


# -- IPython magic ---------------------------------------------------------------------------


def _submit_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, add_help=True)
    p.add_argument("--group", help="the group to charge (one of yours with a queue)")
    p.add_argument("--gpu", "--accelerator", dest="accelerator", help="accelerator, e.g. a100")
    p.add_argument("--profile", help="catalogue profile")
    p.add_argument("--image", help="catalogue image name")
    p.add_argument("--size", help="catalogue size name")
    p.add_argument("--count", type=int, help="accelerators per completion")
    p.add_argument("--name", help="job name (lower-case, digits, -)")
    p.add_argument("--completions", type=int, help="number of indexed completions")
    p.add_argument("--parallelism", type=int, help="completions running at once")
    p.add_argument("--time", dest="max_run_time", type=int, help="maximum run time, seconds")
    p.add_argument("--priority", help="low, normal, high (as configured)")
    p.add_argument("--offload", action="store_true", default=None, help="interLink offload")
    p.add_argument("--file", dest="files", action="append", default=[], help="input file")
    p.add_argument(
        "--clean-env",
        dest="inherit_env",
        action="store_false",
        help="do not pass this environment's PATH, virtualenv or conda env to the job",
    )
    return p


def _fields(args: argparse.Namespace) -> dict:
    fields = {
        k: getattr(args, k)
        for k in (
            "group",
            "accelerator",
            "profile",
            "image",
            "size",
            "count",
            "name",
            "completions",
            "parallelism",
            "max_run_time",
            "priority",
            "offload",
            "inherit_env",
        )
    }
    if args.files:
        files = {}
        for path in args.files:
            with open(path) as f:
                files[os.path.basename(path)] = f.read()
        fields["files"] = files
    return fields


def batch_magic(line: str, cell: str, client: BatchClient | None = None) -> dict:
    """``%%batch [options] [--wait] [--logs]``: the cell is the job's shell script."""
    parser = _submit_parser("%%batch")
    parser.add_argument("--wait", action="store_true", help="wait and show progress")
    parser.add_argument("--logs", action="store_true", help="print logs of index 0 at the end")
    args = parser.parse_args(shlex.split(line))
    client = client or BatchClient()
    job = client.submit(script=cell, **_fields(args))
    print(f"submitted {job['id']} to group {job['group']}'s queue")
    if job.get("warning"):
        print(f"warning: {job['warning']}")
    if args.wait or args.logs:
        job = client.wait(job["id"])
        if args.logs:
            try:
                print(client.logs(job["id"]), end="")
            except BatchError as e:
                print(f"(no logs: {e.message})")
    return job


def load_ipython_extension(ipython) -> None:
    """``%load_ext labfleet_batch.client`` registers ``%%batch``."""

    def batch(line, cell):
        try:
            return batch_magic(line, cell)
        except BatchError as e:
            print(f"batch: {e.message}", file=sys.stderr)
        except SystemExit:  # argparse already printed the usage
            pass

    ipython.register_magic_function(batch, magic_kind="cell", magic_name="batch")


# -- CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, client: BatchClient | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labfleet-batch", description="labfleet batch jobs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", parents=[_submit_parser("submit")], add_help=False)
    s.add_argument(
        "script",
        nargs="?",
        help="script file (e.g. a Snakemake jobscript), - for stdin; "
        "or, after --, a command and its arguments",
    )
    for name in ("status", "wait", "cancel"):
        sub.add_parser(name).add_argument("job_id")
    lg = sub.add_parser("logs")
    lg.add_argument("job_id")
    lg.add_argument("--index", type=int, default=0)
    lg.add_argument("--follow", "-f", action="store_true")
    ls = sub.add_parser("list")
    ls.add_argument("--group")
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first "--" is the job's command, verbatim
    command = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    try:
        client = client or BatchClient()
        if args.cmd == "submit":
            script = None
            if command is not None and args.script:
                parser.error("give either a script file or -- COMMAND, not both")
            if args.script == "-":
                script = sys.stdin.read()
            elif args.script:
                with open(args.script) as f:
                    script = f.read()
            if script is None and not command:
                parser.error("submit needs a script file, - (stdin) or -- COMMAND ...")
            job = client.submit(command=command, script=script, **_fields(args))
            if job.get("warning"):
                print(f"labfleet-batch: warning: {job['warning']}", file=sys.stderr)
            print(job["id"])  # only the id: Snakemake reads it
        elif args.cmd == "status":
            job = client.status(args.job_id)
            print(job["snakemake_status"])  # stdout: only the word (Snakemake reads it)
            if job.get("state") == "failed" and job.get("message"):
                print(describe(job), file=sys.stderr)  # why, for a person
        elif args.cmd == "wait":
            job = client.wait(args.job_id, progress=lambda m: print(m, file=sys.stderr))
            return 0 if job["state"] == "succeeded" else 1
        elif args.cmd == "cancel":
            print(describe(client.cancel(args.job_id)))
        elif args.cmd == "logs":
            if args.follow:
                for chunk in client.follow_logs(args.job_id, args.index):
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
            else:
                sys.stdout.write(client.logs(args.job_id, args.index))
        elif args.cmd == "list":
            for job in client.list(args.group):
                print(describe(job))
    except BatchError as e:
        if args.cmd == "status" and e.status == 404:
            print("failed")  # gone (cancelled or cleaned up): Snakemake must not wait forever
            return 0
        print(f"labfleet-batch: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
