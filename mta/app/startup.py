"""The part of ``twistd smtpgw``'s start-up that can fail, done before anything else runs.

twistd builds the service tree (``makeService``) before it starts logging, becomes a daemon or writes
its pid file, so what is done here is reported on the terminal (or the journal) as one line,
``FILE: <key>: <problem>``, with a non-zero exit status and no traceback, and nothing has started:
no listener accepts, no spool writer runs (but the one proving it can), no file has changed but the spool's folders. In order:

1. the spool: its folders are made and a file is written there, as the user twistd will run as
   (``-u/-g``), and ``<spool>/gateway.lock`` is taken, so a second gateway on the same spool stops here,
   naming the pid that holds it (:class:`mta.workers.lock.SpoolLock`); then the spool writer is started
   once as that user (its Python and the installation must be readable to it) and stopped -- a writer
   that cannot start is said in one line here and in the log, but does not stop the gateway;
2. the listeners: every address is bound (still as root, for port 25), so a port in use is named
   with its key (:class:`mta.workers.endpoint.PreboundEndpoint`).

Configuration errors found earlier (``Options.postOptions``, the same checks as ``smtpgw
check-config``) leave the same way, without twistd's usage text.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, NoReturn

from twisted.python.util import runAsEffectiveUser

from mta.config import Config
from mta.spool.link import child_command as writer_command, cannot_start, os_problem
from mta.spool.store import SpoolError, prepare_spool
from mta.workers.endpoint import CannotListen, PreboundEndpoint
from mta.workers.lock import SpoolInUse, SpoolLock

EXIT_CONFIG = 2          # the file, or something it names, is wrong (as `smtpgw check-config`)
EXIT_UNAVAILABLE = 1     # something the gateway needs is taken: the spool, an address


def fail(line: str, status: int) -> NoReturn:
    """End start-up with ``line`` on stderr and ``status``."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()
    raise SystemExit(status)


def service_user(options: Any) -> tuple[int | None, int | None]:
    """The uid and gid twistd switches to after binding (``-u/-g``), as twistd works them out."""
    parent = getattr(options, "parent", None)
    uid = parent.get("uid") if parent is not None else None
    gid = parent.get("gid") if parent is not None else None
    if uid is not None and gid is None:
        import pwd
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def claim_spool(config_path: str, config: Config, uid: int | None = None, gid: int | None = None) -> SpoolLock:
    """Make the spool ready and lock it, or fail naming ``gateway.spool``."""
    spool = os.path.abspath(config.gateway.spool)

    def claim() -> SpoolLock:
        prepare_spool(spool)
        lock = SpoolLock(spool)
        lock.acquire()
        return lock

    try:
        if uid is not None and os.geteuid() == 0:
            return runAsEffectiveUser(uid, gid if gid is not None else os.getegid(), claim)
        return claim()
    except SpoolError as e:
        fail(f"{config_path}: gateway.spool: {e}", EXIT_CONFIG)
    except SpoolInUse as e:
        holder = f"pid {e.pid}" if e.pid else "a process that wrote no pid"
        fail(f"{config_path}: gateway.spool: {e.path} is in use by another gateway ({holder}); stop it, "
             "or give this gateway a spool of its own", EXIT_UNAVAILABLE)
    except OSError as e:
        fail(f"{config_path}: gateway.spool: {e.filename or spool}: {e.strerror or e}", EXIT_CONFIG)


def check_writer(config_path: str, config: Config, uid: int | None = None, gid: int | None = None) -> str | None:
    """Start the spool writer once, as the user twistd will run as (``--check``: it opens the queue
    folder and stops); None when it ran, else the one line that says why not and what to do.

    Not a reason to stop: the gateway starts the writer again for each message until it can (so
    fixing the cause needs no restart), and answers 451 4.3.0 meanwhile, as with a full disk."""
    queue_dir = os.path.join(os.path.abspath(config.gateway.spool), "queue")
    _, args, env = writer_command()
    switch = uid is not None and os.geteuid() == 0 and uid != 0
    user = {"user": uid, "group": gid if gid is not None else os.getegid(), "extra_groups": []} if switch else {}
    try:
        done = subprocess.run([*args, "--check", queue_dir], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120, **user)
    except OSError as e:
        problem = os_problem(e)
    except subprocess.TimeoutExpired:
        problem = "it did not start within 120s"
    else:
        if done.returncode == 0:
            return None
        said = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        problem = f"it ended at once (exit status {done.returncode})" + (f": {said[-1]}" if said else "")
    return (f"{config_path}: gateway.spool: {cannot_start(problem, uid if switch else None)}; "
            "until it can, every message is answered 451 4.3.0")


def warn(line: str) -> None:
    """A start-up problem that does not stop the gateway: on stderr now (the terminal, the journal)."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def bind_listeners(config_path: str, services: Any) -> None:
    """Bind every pre-bound endpoint among ``services`` (a MultiService), in order, or fail naming
    the first address that cannot be had (those bound so far close with the process)."""
    for svc in services:
        endpoint = getattr(svc, "endpoint", None)
        if isinstance(endpoint, PreboundEndpoint):
            try:
                endpoint.bind()
            except CannotListen as e:
                fail(f"{config_path}: {e}", EXIT_UNAVAILABLE)
