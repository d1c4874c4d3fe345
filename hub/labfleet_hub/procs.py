"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (Linux only).

    ``labfleet up`` may be killed without a chance to clean up (SIGKILL, a
    closed terminal, a test runner timing out); the hub, the proxy and the
    identity provider must not keep ports busy after it.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # A shell starts background jobs with SIGINT ignored, and an ignored signal
    # stays ignored across exec: JupyterHub then cannot interrupt its services
    # and waits out its timeouts (30 s) at every shutdown. Restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (checked before starting a server).

    Without it a server that cannot bind may look healthy: the previous one
    still answering on that port passes every readiness check.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def die_with_hub() -> None:
    """For a hub-managed service: stop when the hub that started it dies.

    JupyterHub stops its managed services when it shuts down cleanly; a hub
    that is killed cannot, and the service would keep its port. Only applies
    when started by the hub (``JUPYTERHUB_SERVICE_NAME`` set), so a service
    run by hand or in a container keeps its ordinary lifetime.
    """
    import os

    if os.environ.get("JUPYTERHUB_SERVICE_NAME"):
        die_with_parent()
        # the hub stops its services with SIGINT first: make it interrupt us
        signal.signal(signal.SIGINT, signal.default_int_handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for a service's loop to wait on and stop cleanly.

    Call it first thing in the running loop. JupyterHub stops its managed
    services with SIGINT (then SIGTERM), and Ctrl-C sends SIGINT to a service
    run by hand: without these handlers it raises ``KeyboardInterrupt``
    wherever the loop happens to be, and the traceback lands in the hub's log.
    """
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, event.set)
    return event
