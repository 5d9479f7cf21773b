"""Child processes and what /proc says about them: CPU time and memory.

Shared by every benchmark here.  Nothing in this module knows what the
processes are; `bench/targets.py` knows how to start olb, nginx and HAProxy.

CPU: `CpuSample` reads two counters per process.  `utime+stime` from
/proc/<pid>/stat tick at 1/CLK_TCK (10 ms), so a before/after difference is
off by up to one tick; the first field of /proc/<pid>/task/*/schedstat is the
scheduler's own nanosecond total (sum_exec_runtime) per thread.  The overhead
benchmark reports the nanosecond figure, since a proxy as cheap as nginx uses
only a few ticks in a phase, and keeps the tick figure as a cross-check.

Memory: `memory()` sums VmRSS and VmHWM (the peak RSS) from /proc/<pid>/status,
and Pss from /proc/<pid>/smaps_rollup, over a set of processes.  For a proxy
with forked workers the RSS sum counts the pages they share once per process;
Pss splits those pages among the sharers, so it is the fair total.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_S = 1.0 / CLK_TCK
#: Seconds to wait for a child process to print its address.
START_TIMEOUT = 20.0


# --- CPU -----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # Field 2 (comm) is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rfind(b")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (olb's supervisor and its workers, nginx's master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


class CpuSample:
    """utime+stime ticks (and stime alone) and schedstat nanoseconds of a set of processes at one instant."""

    __slots__ = ("pids", "ticks", "sys_ticks", "ns_by_pid")

    def __init__(self, pids):
        self.pids = frozenset(pids)
        self.ticks = 0
        self.sys_ticks = 0
        self.ns_by_pid: dict[int, int] = {}
        for pid in self.pids:
            try:
                f = _stat_fields(pid)
                # Fields 14 and 15 (utime, stime); index 0 here is field 3.
                self.ticks += int(f[11]) + int(f[12])
                self.sys_ticks += int(f[12])
            except (OSError, IndexError, ValueError):
                continue
            ns = 0
            for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
                try:
                    with open(path, "rb") as fh:
                        ns += int(fh.read().split()[0])
                except (OSError, IndexError, ValueError):
                    pass
            self.ns_by_pid[pid] = ns

    @property
    def ns(self) -> int:
        """schedstat nanoseconds of all the processes."""
        return sum(self.ns_by_pid.values())


def cpu_delta(before: CpuSample, after: CpuSample) -> dict:
    return {
        "cpu_s": (after.ticks - before.ticks) * TICK_S,
        "cpu_s_schedstat": (after.ns - before.ns) / 1e9,
        # The kernel's share (syscalls, loopback TCP): what a proxy in C pays too.
        "sys_s": (after.sys_ticks - before.sys_ticks) * TICK_S,
        # Per process (a supervisor and its workers): how evenly the work was spread.
        "by_process_s": {pid: (after.ns_by_pid[pid] - before.ns_by_pid.get(pid, 0)) / 1e9
                         for pid in after.ns_by_pid},
        # A worker that died and was replaced mid-phase takes its CPU time with it.
        "same_processes": before.pids == after.pids,
    }


def other_share(busy_ticks: int, cpu: dict, seconds: float) -> float:
    """Share of the machine's CPU that processes other than `cpu`'s took over `seconds`.

    `busy_ticks` is machine_busy_ticks()'s difference over the window, `cpu`
    the cpu_delta()s of the processes measured. The rest is other people's
    work (it skews throughput, not the per-op CPU figures) plus softirq time
    the kernel charges to no process.
    """
    ours = sum(d["cpu_s"] for d in cpu.values())
    other = busy_ticks * TICK_S - ours
    return max(0.0, other) / (seconds * (os.cpu_count() or 1)) if seconds > 0 else 0.0


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine spent busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return user + nice + system + irq + softirq + steal


# --- memory --------------------------------------------------------------------------------------

_STATUS_KEYS = {b"VmRSS:": "rss_kib", b"VmHWM:": "hwm_kib"}


def memory(pids) -> dict:
    """Summed VmRSS, VmHWM and Pss (KiB) of `pids`; processes that are gone count 0."""
    out = {"rss_kib": 0, "hwm_kib": 0, "pss_kib": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    key = _STATUS_KEYS.get(line[:6])
                    if key:
                        out[key] += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        out["pss_kib"] += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            pass
    return out


# --- child processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    """A child process; stdout is scanned for `lines` matches of `pattern`, stderr kept in a temp file.

    With `pattern` None, stdout is discarded and the caller finds out readiness itself.
    """

    def __init__(self, argv: list[str], env: dict | None = None, pattern: bytes | None = None,
                 lines: int = 1, pass_fds: tuple = (), cwd: str | None = None):
        self.argv = argv
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pattern else subprocess.DEVNULL,
                                     stderr=self.errfile, preexec_fn=_die_with_parent,
                                     pass_fds=pass_fds, cwd=cwd)
        self.found: list[str] = []
        if pattern is None:
            return
        deadline = time.monotonic() + START_TIMEOUT
        fd = self.proc.stdout.fileno()
        pending = b""
        while len(self.found) < lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"{' '.join(argv)}: no address within {START_TIMEOUT:g} s:\n"
                                   f"{self.stderr_tail()}")
            data = os.read(fd, 4096)
            if not data:
                self.stop()
                raise RuntimeError(f"{' '.join(argv)} exited early:\n{self.stderr_tail()}")
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                m = re.search(pattern, line)
                if m and len(self.found) < lines:
                    self.found.append(m.group(1).decode())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, limit: int = 4000, skip: str = "") -> str:
        """The end of what the child wrote to stderr, without lines starting with `skip`."""
        self.errfile.seek(0)
        text = self.errfile.read().decode(errors="replace")
        if skip:
            text = "".join(line for line in text.splitlines(True) if not line.startswith(skip))
        return text[-limit:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def address(url: str) -> tuple[str, int]:
    """`http://host:port` (or `host:port`), as a child prints where it listens -> (host, port)."""
    host, port = url.split("//", 1)[-1].rsplit(":", 1)
    return host, int(port)


def find_exe(name: str) -> str | None:
    """`name` on PATH or in the sbin directories Debian installs nginx and HAProxy into."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def tool_version(exe: str | None, *args: str) -> str | None:
    """First line a program prints for its version flag (nginx prints it on stderr), or None."""
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine() -> dict:
    """What a reader needs to compare figures across machines."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "kernel": platform.release(), "clk_tck": CLK_TCK,
            "nginx": tool_version(find_exe("nginx"), "-v"),
            "haproxy": tool_version(find_exe("haproxy"), "-v")}
