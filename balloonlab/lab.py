"""`Lab`: a private balloon-hostd with a memory budget and the guests a test squeezes.

    with Lab(host_memory="1GiB") as lab:
        web = lab.guest("web", command=["python3", "-m", "http.server", "8080"], memory="256MiB", swap="256MiB")
        db = lab.attach("docker:my-postgres")          # a running container with a memory limit
        timeline = lab.watch()
        web.squeeze(to="128MiB")
        assert web.facts().oom_kills == 0

hostd listens on free loopback ports with its own control token, settings and state files
in the lab's directory; guests are memory cgroups below a parent made for this lab
(`balloonlab-api-PID-RANDOM`). Everything is undone on exit — on exceptions and Ctrl-C too,
SIGTERM is turned into an exception while the lab runs, and the processes the lab starts die
with it even after a `kill -9` (PR_SET_PDEATHSIG); cgroups of a lab whose process is gone
are removed by the next lab. Needs root and swap (`LabError` says so otherwise).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

from balloonlab.guest import Guest, Size, to_bytes
from balloonlab.host import die_with_parent, free_loopback_port, lab_unavailable_reason
from balloonlab.timeline import Sample, Timeline
from hostd.client import ControlCredentials, CtlError, HostdClient
from lab import cgroups

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CGROUP_PREFIX = "balloonlab-api"


class LabError(RuntimeError):
    """The lab cannot start or a guest cannot be added; the message says why."""


def remove_stale_cgroups(prefix: str = CGROUP_PREFIX) -> list[Path]:
    """Parents PREFIX-PID-… of labs whose process is gone (an interrupted run): emptied and removed."""
    removed = []
    with contextlib.suppress(cgroups.CgroupSetupError):
        base = cgroups.memory_hierarchy(cgroups.memory_cgroup_version())
        for path in base.glob(f"{prefix}-*"):
            pid = path.name.removeprefix(f"{prefix}-").split("-")[0]
            if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(cgroups.CgroupSetupError, OSError):
                    cgroups.remove(path)
                    removed.append(path)
    return removed


class Lab:
    """A hostd of its own and guests in memory cgroups (or attached). Use as a context
    manager, or call start() and close() (close is idempotent and also runs at exit)."""

    def __init__(self, host_memory: Size = "1GiB", *, idle_tax: float = 0.75, sample_period: str = "5s",
                 balance_period: str = "1s", report_interval: str = "500ms", workdir: Path | None = None,
                 hostd_args: Sequence[str] = (), register_timeout: float = 30.0) -> None:
        self.host_memory_bytes = to_bytes(host_memory)
        self.idle_tax_ratio = idle_tax
        self.sample_period = sample_period
        self.balance_period = balance_period
        self.report_interval = report_interval
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="balloonlab-"))
        self.hostd_args = tuple(hostd_args)
        self.register_timeout = register_timeout
        self.guests: dict[str, Guest] = {}
        self.timeline = Timeline()
        self.timeline_path: Path | None = None  # where the timeline is saved (named in assertion messages)
        self.name = f"{CGROUP_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.agent_endpoint = ""
        self.control_endpoint = ""
        self._client: HostdClient | None = None
        self._hostd: subprocess.Popen[bytes] | None = None
        self._parent: Path | None = None
        self._version = 0
        self._started = time.monotonic()
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._watch_interval = 0.5
        self._old_sigterm: Any = None
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def start(self) -> Lab:
        reason = lab_unavailable_reason()
        if reason:
            raise LabError(reason)
        import atexit

        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.getsignal(signal.SIGTERM)
            if self._old_sigterm in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _sigterm_as_exception)
        try:
            self._start_hostd()
            remove_stale_cgroups()
            self._version = cgroups.memory_cgroup_version()
            self._parent = cgroups.create_parent(self._version, self.name)
        except BaseException:
            self.close()
            raise
        return self

    def _start_hostd(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        agent_port, control_port = free_loopback_port(), free_loopback_port()
        self.agent_endpoint = f"tcp://127.0.0.1:{agent_port}"
        self.control_endpoint = f"tcp://127.0.0.1:{control_port}"
        token = self.workdir / "control.token"
        argv = [sys.executable, "-m", "hostd", "--agent-endpoint", self.agent_endpoint,
                "--control-endpoint", self.control_endpoint, "--http", "off",
                "--host-memory", str(self.host_memory_bytes), "--idle-tax", str(self.idle_tax_ratio),
                "--sample-period", self.sample_period, "--balance-period", self.balance_period,
                "--report-interval", self.report_interval, "--control-token-file", str(token),
                "--settings-file", str(self.workdir / "hostd-settings.json"),
                "--vswap-state-file", str(self.workdir / "hostd-vswap.json"),
                "--event-log", str(self.workdir / "events.jsonl"),
                "--timeline", str(self.workdir / "hostd-timeline.jsonl"), *self.hostd_args]
        self._hostd = self._spawn(argv, self.workdir / "hostd.log")
        self._client = HostdClient(self.control_endpoint, credentials=ControlCredentials(token_file=token))
        deadline = time.monotonic() + 20
        while True:
            if self._hostd.poll() is not None:
                raise LabError(f"hostd exited with code {self._hostd.returncode}: {self._log_tail('hostd.log')}")
            try:
                self._client.status(500)
                break
            except CtlError:
                if time.monotonic() > deadline:
                    raise LabError(f"hostd did not answer within 20 s: {self._log_tail('hostd.log')}") from None
        self._started = time.monotonic()
        self.mark(f"hostd up: {self.host_memory_bytes >> 20} MiB, τ={self.idle_tax_ratio:g}")

    def close(self) -> None:
        """Stop the sampler, every guest (agents deflate and say bye) and hostd; remove the cgroups."""
        if self._closed:
            return
        self._closed = True
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for guest in list(self.guests.values()):  # all at once: each agent deflates and says bye
            with contextlib.suppress(Exception):
                guest.request_stop()
        for guest in list(self.guests.values()):
            with contextlib.suppress(Exception):
                guest.wait_stopped()
        if self._parent is not None:
            with contextlib.suppress(cgroups.CgroupSetupError, OSError):
                cgroups.remove(self._parent)
        if self._hostd is not None and self._hostd.poll() is None:
            self._hostd.terminate()
            try:
                self._hostd.wait(10)
            except subprocess.TimeoutExpired:
                self._hostd.kill()
                self._hostd.wait(5)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, self._old_sigterm)

    # ---- helpers ------------------------------------------------------------------------------
    def _spawn(self, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None,
               cgroup: Path | None = None) -> subprocess.Popen[bytes]:
        environment = dict(env if env is not None else os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")]))

        def prepare() -> None:
            die_with_parent()
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        with open(log_path, "ab") as log_file:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=environment, start_new_session=True, preexec_fn=prepare)

    def _log_tail(self, name: str, lines: int = 12) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / name).read_text(errors="replace").splitlines()[-lines:])
        return ""

    @property
    def client(self) -> HostdClient:
        if self._client is None:
            raise LabError("the lab is not started")
        return self._client

    @property
    def attach_state_dir(self) -> Path:
        return self.workdir / "attach"

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def status(self) -> dict[str, Any]:  # the StatusDocument, as a plain dict for tests to index
        """hostd's whole status document (`balloonctl status --json`)."""
        return cast(dict[str, Any], self.client.status())

    def set_host(self, **params: int | float | str | bool | None) -> None:
        """idle_tax_ratio, host_memory_bytes, sample_period_ms, balance_period_ms, ctl_max_percent."""
        self.client.set_host(**params)
        self.mark(f"host {params}")

    def idle_tax(self, ratio: float) -> None:
        self.set_host(idle_tax_ratio=ratio)

    def host_memory(self, size: Size) -> None:
        self.set_host(host_memory_bytes=to_bytes(size))

    def mark(self, text: str) -> None:
        """An event on the timeline (the lab marks its own actions)."""
        self.timeline.mark(self.elapsed_s(), text)

    # ---- guests -------------------------------------------------------------------------------
    def guest(self, name: str, *, command: Sequence[str] | None = None, phases: str | None = None,
              memory: Size = "256MiB", swap: Size = "256MiB", shares: int | str | None = None,
              env: Mapping[str, str] | None = None, wait: bool = True) -> Guest:
        """A memory cgroup of `memory` (+ `swap` of its own) running `command` — or
        balloon-workload with `phases` — beside a balloon agent registered as `name`. The
        command finds $BALLOONLAB_WORKLOAD_REPORT in its environment: a JSON report written
        there (balloon-workload's format) shows up in facts().workload and in hostd."""
        if self._parent is None:
            raise LabError("the lab is not started (use `with Lab(...) as lab:`)")
        if name in self.guests:
            raise LabError(f"guest {name!r} exists already")
        if command and phases:
            raise LabError(f"guest {name}: give a command or balloon-workload phases, not both")
        try:
            path = cgroups.create_guest(self._parent, self._version, name, to_bytes(memory), to_bytes(swap))
        except (cgroups.CgroupSetupError, OSError) as exc:
            raise LabError(f"guest {name}: {exc}") from None
        report = self.workdir / f"{name}.workload.json"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BALLOONLAB_")}
        environment.update(env or {})
        environment.update({"BALLOONLAB_HOST_ENDPOINT": self.agent_endpoint, "BALLOONLAB_VM_ID": name,
                            "BALLOONLAB_CGROUP_PATH": str(path), "BALLOONLAB_WORKLOAD_REPORT": str(report),
                            "BALLOONLAB_REPORT_INTERVAL": self.report_interval})
        argv = [sys.executable, "-m", "guestagent.supervise"]
        argv += ["--", *command] if command else ["--phases", phases or "active 64MiB"]
        log_path = self.workdir / f"{name}.log"
        process = self._spawn(argv, log_path, environment, path)
        guest = Guest(self, name, path, "cgroup", process, report, log_path)
        self.guests[name] = guest
        self.mark(f"guest {name}: {to_bytes(memory) >> 20} MiB + {to_bytes(swap) >> 20} MiB swap")
        if wait:
            self._wait_registered(guest)
        if shares is not None:
            guest.shares(shares)
        return guest

    def attach(self, target: str, vm_id: str | None = None, *, shares: int | str | None = None,
               wait: bool = True) -> Guest:
        """A balloon for a running container / cgroup / process (`docker:NAME`, `cgroup:PATH`,
        `pid:PID`) without an agent in it: see guestagent/attach.py. The attached agent leaves
        when the target stops or the lab closes."""
        from guestagent import attach

        if self._parent is None:
            raise LabError("the lab is not started (use `with Lab(...) as lab:`)")
        try:
            resolved = attach.resolve(target)
            attach.check(resolved)
        except attach.AttachError as exc:
            raise LabError(str(exc)) from None
        name = vm_id or resolved.default_vm_id
        if name in self.guests:
            raise LabError(f"guest {name!r} exists already")
        log_path = self.workdir / f"{name}.attach.log"
        argv = [sys.executable, "-m", "guestagent.attach", target, "--vm-id", name, "--host-endpoint",
                self.agent_endpoint, "--state-dir", str(self.attach_state_dir), "--report-interval",
                self.report_interval]
        process = self._spawn(argv, log_path)
        guest = Guest(self, name, resolved.cgroup_path, "attached", process, None, log_path)
        self.guests[name] = guest
        self.mark(f"attached {name} ({target})")
        if wait:
            self._wait_registered(guest)
        if shares is not None:
            guest.shares(shares)
        return guest

    def _wait_registered(self, guest: Guest) -> None:
        deadline = time.monotonic() + self.register_timeout
        while True:
            if guest.process.poll() is not None:
                raise LabError(f"guest {guest.vm_id} exited with code {guest.process.returncode}:\n"
                               f"{self._log_tail(guest.log_file.name)}")
            with contextlib.suppress(CtlError):
                if guest.status() is not None:
                    return
            if time.monotonic() > deadline:
                raise LabError(f"guest {guest.vm_id} did not register within {self.register_timeout:g} s:\n"
                               f"{self._log_tail(guest.log_file.name)}")
            time.sleep(0.1)

    # ---- watching -----------------------------------------------------------------------------
    def sample(self) -> list[Sample]:
        """One sample of every guest now (what watch() records)."""
        try:
            snapshot = self.client.status(2000)
        except CtlError:
            return []
        by_id = {vm["vm_id"]: cast(dict[str, Any], vm) for vm in snapshot["vms"]}
        samples = []
        for name, guest in list(self.guests.items()):
            vm = by_id.get(name)
            facts = guest.facts(vm or {})
            workload = facts.workload
            samples.append(Sample(
                t_s=facts.t_s, vm_id=name, alive=facts.registered, agent_state=facts.agent_state,
                memsz_bytes=facts.memsz_bytes, balloon_bytes=facts.balloon_bytes,
                balloon_target_bytes=facts.balloon_target_bytes, alloc_target_bytes=facts.alloc_target_bytes,
                usage_bytes=facts.usage_bytes, swap_bytes=facts.swap_bytes,
                unevictable_bytes=facts.unevictable_bytes, oom_kills=facts.oom_kills,
                major_faults=facts.major_faults, refaults=facts.refaults,
                touches_per_s=_number(workload.get("touches_per_s")),
                latency_p99_us=_number(workload.get("latency_p99_us"))))
        return samples

    def watch(self, interval: float = 0.5, extra: Callable[[], Mapping[str, Mapping[str, float]]] | None = None
              ) -> Timeline:
        """Start sampling every guest in the background (once; later calls return the same
        timeline). `extra()` may add per-guest values ({vm_id: {name: value}}) to each sample."""
        if self._watcher is None:
            self._watch_interval = interval

            def run() -> None:
                while not self._stop_watching.is_set():
                    samples = self.sample()
                    if extra is not None and samples:
                        with contextlib.suppress(Exception):
                            more = extra()
                            samples = [Sample(**{**_fields(s), "extra": {**s.extra, **more.get(s.vm_id, {})}})
                                       for s in samples]
                    self.timeline.add(samples)
                    self._stop_watching.wait(self._watch_interval)

            self._watcher = threading.Thread(target=run, name="balloonlab-watch", daemon=True)
            self._watcher.start()
        return self.timeline


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fields(sample: Sample) -> dict[str, Any]:
    return {name: getattr(sample, name) for name in sample.__dataclass_fields__}


def _sigterm_as_exception(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
