"""Start N processes of a jaxrlhf command on this machine as N JAX "hosts" (one coordinator on 127.0.0.1).

Each process gets the standard multi-host environment, which :func:`jaxrlhf.parallel.initialize_distributed`
reads (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), and, with
``--local-devices K``, K simulated CPU devices. The coordinator's port is chosen free at run time. Every
process's output (stdout and stderr) goes to ``<log-dir>/process_<i>.log``; process 0's is echoed. When a
process cannot start, dies or outlives ``--timeout``, the others are stopped and the error names it with its
last output lines, so a failed launch never hangs.

    python -m jaxrlhf.launch --processes 2 --local-devices 4 -- ppo --config configs/ppo.yaml
    python -m jaxrlhf.launch -n 2 --program -- python benchmarks/ppo_iteration.py --data 8

``{process_id}`` in an argument or in an environment variable's value is replaced by each process's id
(e.g. a per-process ``logging.run_dir``, or ``XLA_FLAGS=--xla_dump_to=hlo-{process_id}``).
This simulates a cluster on one machine; on a real cluster start the command on every host yourself with
the same three variables (see the README).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Replaced by each process's id in the arguments and in the values of the environment.
PROCESS_ID_PLACEHOLDER = "{process_id}"
# What jaxrlhf.parallel.initialize_distributed reads (kept apart so that this module does not import JAX).
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)
_TAIL_LINES = 40
_PORT_IN_USE = re.compile(r"address already in use|failed to bind|bind\(\) failed", re.IGNORECASE)


class LaunchError(RuntimeError):
    """A launched process could not start, failed, or ran past the timeout."""


@dataclasses.dataclass
class ProcessResult:
    """One finished process: its id, exit code, whole output (stdout and stderr interleaved) and log file."""

    process_id: int
    returncode: int
    output: str
    log_path: str


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now: bind port 0 and read back what the OS chose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def jaxrlhf_command(args: Sequence[str]) -> list[str]:
    """The argv of ``jaxrlhf <args>`` with this interpreter."""
    return [sys.executable, "-m", "jaxrlhf.cli", *args]


def process_env(
    process_id: int,
    num_processes: int,
    coordinator: str,
    local_devices: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default ``os.environ``) with ``{process_id}`` in
    its values replaced by the id, the multi-host variables (none for a single process, which then runs as it
    would on its own), and with ``local_devices`` a CPU platform with that many simulated devices (replacing
    any device count already in ``XLA_FLAGS``)."""
    env = {k: v.replace(PROCESS_ID_PLACEHOLDER, str(process_id))
           for k, v in (os.environ if base is None else base).items()}
    env["PYTHONUNBUFFERED"] = "1"  # so the last lines before a crash reach the log
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        env.pop(name, None)
    if num_processes > 1:
        env.update(
            {
                COORDINATOR_ENV: coordinator,
                NUM_PROCESSES_ENV: str(num_processes),
                PROCESS_ID_ENV: str(process_id),
                # The coordinator listens on the loopback interface only (JAX's default is every interface).
                "JAX_COORDINATOR_BIND_ADDRESS": coordinator,
            }
        )
    if local_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={local_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


class _Process:
    """A child process whose merged output a thread copies to its log file, keeping the last lines."""

    def __init__(self, process_id: int, argv: list[str], env: dict[str, str], log_path: Path, echo: bool):
        self.process_id, self.log_path, self.echo = process_id, log_path, echo
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.log = open(log_path, "w")
        try:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,  # its own process group, so stopping it stops its children too
            )
        except OSError as e:
            self.log.close()
            raise LaunchError(f"process {process_id} could not start ({argv[0]}): {e}") from e
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                self.log.write(line)
                self.tail.append(line.rstrip("\n"))
                if self.echo:
                    print(line, end="", file=sys.stderr, flush=True)
            self.log.flush()
        except ValueError:  # the log was closed by finish() after its timeout: nothing more to keep
            pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM its process group, then SIGKILL after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            if self.popen.poll() is not None:
                return
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue

    def finish(self) -> str:
        """Wait for the output to be copied; the whole log."""
        self.reader.join(timeout=10)
        if not self.log.closed:
            self.log.close()
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        code = self.popen.poll()
        state = "still running" if code is None else f"exit code {code}"
        lines = "\n".join(f"  | {line}" for line in self.tail) or "  | (no output)"
        return f"process {self.process_id} ({state}; log {self.log_path}), last lines:\n{lines}"


def launch(
    argv: Sequence[str],
    num_processes: int,
    local_devices: int | None = None,
    timeout: float = 600.0,
    log_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    echo: bool = False,
    port_retries: int = 2,
) -> list[ProcessResult]:
    """Run ``argv`` as ``num_processes`` processes of one JAX job on this machine; returns their results.

    ``{process_id}`` in an argument or in a value of the environment becomes each process's id.
    ``local_devices`` simulates that many CPU devices per process; ``env`` replaces ``os.environ`` as the base
    environment. Raises :class:`LaunchError` naming the process at fault (and its last output lines) when one
    cannot start, exits non-zero or runs past ``timeout`` seconds; the other processes are stopped first. A
    coordinator port taken between choosing it and binding it is retried with a new port ``port_retries``
    times.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    log_root = Path(tempfile.mkdtemp(prefix="jaxrlhf-launch-") if log_dir is None else log_dir)
    log_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(port_retries + 1):
        try:
            return _launch_once(argv, num_processes, local_devices, timeout, log_root, env, echo)
        except _PortTaken as e:
            if attempt == port_retries:
                raise LaunchError(str(e)) from None
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _launch_once(
    argv: Sequence[str],
    num_processes: int,
    local_devices: int | None,
    timeout: float,
    log_root: Path,
    env: Mapping[str, str] | None,
    echo: bool,
) -> list[ProcessResult]:
    coordinator = f"127.0.0.1:{free_port()}"
    procs: list[_Process] = []
    try:
        for i in range(num_processes):
            args = [a.replace(PROCESS_ID_PLACEHOLDER, str(i)) for a in argv]
            penv = process_env(i, num_processes, coordinator, local_devices, env)
            procs.append(_Process(i, args, penv, log_root / f"process_{i}.log", echo=echo and i == 0))
        deadline = time.monotonic() + timeout
        exited: list[_Process] = []  # in the order they were seen to end: the first failure is the cause
        while True:
            codes = [p.popen.poll() for p in procs]
            exited += [p for p, c in zip(procs, codes) if c is not None and p not in exited]
            failed = [p for p in exited if p.popen.returncode != 0]
            if failed:
                time.sleep(0.5)  # let a crash's last lines reach the reader thread
                first = failed[0]
                for p in procs:
                    p.stop()
                for p in procs:
                    p.finish()
                if any(_PORT_IN_USE.search(line) for line in first.tail):
                    raise _PortTaken(f"coordinator port {coordinator} was taken:\n{first.describe()}")
                others = "\n".join(p.describe() for p in procs if p is not first)
                raise LaunchError(
                    f"{len(procs)}-process launch of {' '.join(argv)!r} failed: process {first.process_id} "
                    f"exited with code {first.popen.returncode}; the others were stopped.\n"
                    f"{first.describe()}\n{others}"
                )
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                running = [p for p, c in zip(procs, codes) if c is None]
                for p in procs:
                    p.stop()
                for p in procs:
                    p.finish()
                raise LaunchError(
                    f"{len(procs)}-process launch of {' '.join(argv)!r} timed out after {timeout:.0f} s; "
                    f"process(es) {[p.process_id for p in running]} still running were stopped.\n"
                    + "\n".join(p.describe() for p in running)
                )
            time.sleep(0.1)
        return [ProcessResult(p.process_id, 0, p.finish(), str(p.log_path)) for p in procs]
    except BaseException:
        for p in procs:  # e.g. KeyboardInterrupt, or a later process that could not start
            p.stop()
        for p in procs:
            p.finish()
        raise


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrlhf.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--processes", type=int, required=True, help="number of processes (hosts)")
    parser.add_argument(
        "--local-devices", type=int, default=None, help="simulated CPU devices per process (default: real)"
    )
    parser.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds before all are stopped")
    parser.add_argument("--log-dir", default=None, help="where process_<i>.log go (default: a temp dir)")
    parser.add_argument(
        "--program",
        action="store_true",
        help="the arguments are a program and its arguments, not a jaxrlhf command",
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: the jaxrlhf command and its flags"
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    full = command if args.program else jaxrlhf_command(command)
    signal.signal(signal.SIGTERM, _interrupt)  # stopping the launcher stops its processes
    try:
        results = launch(full, args.processes, args.local_devices, args.timeout, args.log_dir, echo=True)
    except LaunchError as e:
        print(f"jaxrlhf.launch: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxrlhf.launch: interrupted; all processes stopped", file=sys.stderr)
        return 130
    print(
        f"jaxrlhf.launch: {len(results)} processes finished; logs in {Path(results[0].log_path).parent}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
