"""Starting or joining Ray, for every command that uses it (`curate run`'s Ray runner, `curate mine`).

Here rather than in the engine so that the trainer's commands (`mine`) join a cluster the same
way without importing the pipeline's runner.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

CONNECT_TIMEOUT_S = 5.0


class RunnerError(Exception):
    """The runner cannot execute this config here: an unreachable cluster, a GPU stage without GPUs.

    Raised before any work; the CLI reports it with exit code 2.
    """


def connect(address: str | None, workers: int | str | None = None) -> bool:
    """Start or join Ray, for every command that uses it (`run`, `mine`); True when this call did it
    (and the caller must shut it down).

    `address` None starts a fresh local instance with `workers` CPUs (an int; "auto" or None: all
    of them) and never joins a running one. An existing connection in this process (a notebook,
    the benchmark) is reused as is.
    """
    if address is None and "ray" not in sys.modules:
        _import_ray_with_loopback_node_address()
    import ray

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        # "local", not None: ray.init() would silently join a cluster found via
        # RAY_ADDRESS or /tmp/ray, and the caller promises a fresh local instance.
        num_cpus = workers if isinstance(workers, int) else None
        # Not the user's concern on a local instance: Ray's notice that token auth is on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ray.init(address="local", num_cpus=num_cpus, **quiet)
        except Exception as e:
            raise RunnerError(f"could not start a local Ray instance: {type(e).__name__}: {e}") from e
        return True
    check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except Exception as e:  # ConnectionError, AuthenticationError, version mismatch ...
        raise RunnerError(f"could not join the Ray cluster at runner.address={address!r}: {e}") from e
    return True


# Ray's switch for "the node's address is loopback" (its default on macOS and Windows).
_LOOPBACK_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray_with_loopback_node_address() -> None:
    """Import Ray so that a local instance gets 127.0.0.1 as its node address.

    On Linux Ray finds a node's address by routing a UDP socket towards 8.8.8.8:53; on a machine
    with no route there (offline, or a network namespace) it prints a warning about that on every
    start and falls back to the host name. A local instance is only ever reached from this machine,
    so loopback is its right address and the probe is not the user's concern. Ray reads the switch
    once, when it is first imported, hence only a first import gets it (a process that imported
    Ray before keeps Ray's default), and the variable is restored so that child processes and
    later commands see the user's environment. A value the user set wins.
    """
    previous = os.environ.get(_LOOPBACK_NODE_SWITCH)
    os.environ.setdefault(_LOOPBACK_NODE_SWITCH, "0")
    try:
        import ray  # noqa: F401
    finally:
        if previous is None:
            del os.environ[_LOOPBACK_NODE_SWITCH]


def address_problem(address: str | None) -> str | None:
    """Why `runner.address` names no cluster this machine can join (None: it does, or it is null), found
    in seconds, for `curate validate`: `auto` needs a cluster started here (`ray start`) or RAY_ADDRESS."""
    if address is None or address == "local":
        return None
    if address == "auto":
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if os.environ.get("RAY_ADDRESS") or current.exists():
            return None
        return (
            "'auto' joins a running Ray cluster, and none runs on this machine: start one with "
            "`ray start --head`, or use null (--set runner.address=null) for a local instance for this run"
        )
    try:
        check_reachable(address)
    except RunnerError as e:
        return str(e)
    return None


def check_reachable(address: str) -> None:
    """A TCP connect with a short timeout: an unreachable address fails in seconds, with its name."""
    if address in ("auto", "local"):
        return  # resolved by ray.init from RAY_ADDRESS or /tmp/ray; it fails fast itself
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(
            f"runner.address={address!r} is not an address: use 'auto', 'HOST:PORT' (the head's GCS, "
            "6379 by default) or 'ray://HOST:10001' (Ray Client)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise RunnerError(
            f"cannot reach the Ray cluster at runner.address={address!r} ({reason}); start it with "
            "`ray start --head` on the head node, or remove runner.address to start a local instance"
        ) from None
