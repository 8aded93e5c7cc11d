"""Expert parallelism over several processes: ``jax.distributed`` with CPU collectives over gloo.

Every process runs the same program on its own share: its slice of each global batch and E / P of
every layer's routed experts (ktjax.train's expert mesh spans the devices of all the processes). One
process per socket or host; each reads its part of the settings from the environment:

    JAX_COORDINATOR_ADDRESS   host:port of process 0, where the coordinator listens (every process)
    JAX_NUM_PROCESSES         P, the number of processes (every process)
    JAX_PROCESS_ID            this process's id, 0 .. P - 1
    KTJAX_HEARTBEAT_S         seconds without a heartbeat before a lost process fails the others (30)

``launch`` starts P such processes on this host (``python -m experiments.run NAME --processes P``)
and watches them: when one fails, the others are stopped and the failure is reported naming it.
Output, the run directory and the progress bar come from process 0 (``is_main``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "KTJAX_HEARTBEAT_S"
HEARTBEAT_S = 30  # a process silent this long has failed: the coordinator fails the others
GRACE_S = 10.0  # after one process fails, how long the launcher lets the others end by themselves


class LaunchError(ValueError):
    """Bad launch settings (process count, coordinator port, environment): the message says which."""


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None


def initialize() -> None:
    """Joins the processes named by the environment (JAX_NUM_PROCESSES > 1; module docstring), once,
    before JAX starts its backend. A process started without those settings runs alone."""
    processes = _env_int(ENV_PROCESSES, 1)
    if processes == 1 or jax.distributed.is_initialized():
        return
    process_id = _env_int(ENV_PROCESS_ID)
    address = os.environ.get(ENV_ADDRESS)
    if processes < 1 or process_id is None or not address or not 0 <= process_id < processes:
        raise LaunchError(
            f"{ENV_PROCESSES}={processes} needs {ENV_ADDRESS}=host:port and {ENV_PROCESS_ID} in "
            f"0..{processes - 1} (got {address!r} and {os.environ.get(ENV_PROCESS_ID)!r})"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        address,
        num_processes=processes,
        process_id=process_id,
        heartbeat_timeout_seconds=_env_int(ENV_HEARTBEAT, HEARTBEAT_S),
        initialization_timeout=120,
    )


def is_main() -> bool:
    """Whether this process writes the run's files and prints (process 0, or the only one)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process has reached the point called `name` (nothing to wait for alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(a: jax.Array) -> np.ndarray:
    """The whole of a (possibly process-sharded) array as numpy, on every process (a collective when
    the array spans processes: every process must call it)."""
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def place(a: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds in whole, as a global array laid out by `sharding`:
    each process copies only its own devices' parts."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


# ---------------------------------------------------------------------------------------------------
# The launcher: P processes on this host.


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Raises LaunchError when the coordinator could not listen on `port`."""
    if not 0 < port < 65536:
        raise LaunchError(f"coordinator port {port} is not in 1..65535")
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("::" if socket.has_ipv6 else "0.0.0.0", port))
        except OSError as e:
            raise LaunchError(f"coordinator port {port} is not free ({e.strerror}): pick another") from None


def core_shares(processes: int) -> list[set[int]] | None:
    """This process's cores split evenly among `processes` (consecutive cores together), or None when
    there are fewer cores than processes (then none is pinned)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < processes:
        return None
    per = len(cores) // processes
    return [set(cores[i * per : (i + 1) * per]) for i in range(processes)]


def launch(
    command: Sequence[str],
    processes: int,
    *,
    port: int | None = None,
    pin: bool = True,
    grace_s: float = GRACE_S,
) -> int:
    """Runs `command` as `processes` processes of one job on this host and returns the exit status:
    0 when every process succeeded, else the first failure's (it is reported on stderr naming the
    process, and the others are stopped at most `grace_s` later). Each process gets the environment
    variables of the module docstring and, with `pin`, its share of the cores (KTJAX_NUM_THREADS and
    its CPU affinity). Process 0's output is the job's; the others' stdout is dropped, their stderr kept.
    """
    if processes < 1:
        raise LaunchError(f"--processes must be at least 1, got {processes}")
    if port is None:
        port = free_port()
    check_port(port)
    shares = core_shares(processes) if pin else None
    children: list[subprocess.Popen] = []
    try:
        for rank in range(processes):
            env = {
                **os.environ,
                ENV_ADDRESS: f"localhost:{port}",
                ENV_PROCESSES: str(processes),
                ENV_PROCESS_ID: str(rank),
            }
            cores = shares[rank] if shares else None
            if cores:
                env["KTJAX_NUM_THREADS"] = str(len(cores))
            children.append(
                subprocess.Popen(
                    list(command),
                    env=env,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None,
                )
            )
        return _watch(children, grace_s)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(Exception):
                child.wait(timeout=5)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _watch(children: list[subprocess.Popen], grace_s: float) -> int:
    """Waits for every child; after the first failure, stops the rest (see launch)."""
    failures: list[tuple[int, int]] = []  # (rank, status) in the order they were seen
    deadline = None
    stopped: list[int] = []
    try:
        while True:
            codes = [c.poll() for c in children]
            seen = {rank for rank, _ in failures}
            failures += [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and r not in seen]
            if failures and deadline is None:
                deadline = time.monotonic() + grace_s
            if all(code is not None for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                # killed: JAX catches SIGTERM (preemption notices) and goes on waiting
                stopped = [rank for rank, code in enumerate(codes) if code is None]
                for rank in stopped:
                    children[rank].kill()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("interrupted: stopping every process", file=sys.stderr)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        return 130
    if not failures:
        return 0
    n = len(children)
    what = "; ".join(f"process {rank} of {n} {_describe(code)}" for rank, code in failures)
    if stopped:
        what += f"; stopped process{'es' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))}"
    print(f"the job failed: {what} (a process's own error, if any, is printed above)", file=sys.stderr)
    code = failures[0][1]
    return code if code > 0 else 1
