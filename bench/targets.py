"""What the load is sent to: the backends directly, olb, nginx, HAProxy, or any other balancer.

Each `TargetSpec` starts one proxy in front of a list of backends, on
127.0.0.1, and returns a `Running` that says where it listens and which
processes are its own (for the CPU and memory figures).

nginx and HAProxy get a socket this process has already bound to
127.0.0.1:0 and listens on -- nginx through its `NGINX` environment variable
(the mechanism of its binary upgrade: "fd;fd;" names inherited listening
sockets, which it matches to `listen` directives by address), HAProxy
through `bind fd@N` -- so there is no window in which another process could
take the port.  olb is told `OLB_LISTEN=127.0.0.1:0` and says its port on
stdout.  An `--extra` balancer is given a port that was free a moment ago
(bound, read, closed: the one racy case, since its command line is all we
know of it).

The configurations are what a careful operator would write for LLM streams
(see `nginx_conf` and `haproxy_cfg`): keep-alive to the clients and to the
backends, least-connections balancing, no response buffering, nothing that
costs CPU per request without need (access logs are off everywhere).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field

from .load import http_get
from .proc import Child, find_exe, process_tree

#: Seconds a started proxy has to answer GET /api/version with 200.
READY_TIMEOUT = 15.0

#: `olb` runs with metrics and the access log off (as nginx and HAProxy run here: no access
#: log); `olb-obs` with both on (OLB_METRICS=on, OLB_ACCESS_LOG to a file): their CPU per
#: request is the price of observability (report.check_targets).
#: `floor` is bench/floor.py: a bare uvloop byte pipe, the least a Protocol proxy costs.
KINDS = ("direct", "olb", "olb-obs", "nginx", "haproxy", "floor")
INSTALL_HINT = ("apt-get install -y nginx haproxy  (Debian/Ubuntu; the benchmark runs them as "
                "foreground processes on 127.0.0.1, it needs no service running)")


@dataclass
class Running:
    """A started target: where to send the load, and its processes."""

    name: str
    kind: str
    workers: int
    addresses: list[tuple[str, int]]
    child: Child | None = None
    tmpdir: str | None = None
    sock: socket.socket | None = None
    #: olb's admin listener (/olb/status), or None.
    admin: tuple[str, int] | None = None
    _pids: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The target's own processes (the supervisor or master and its workers); none for direct."""
        if self.child is None:
            return []
        if not self._pids or not all(os.path.exists(f"/proc/{p}") for p in self._pids):
            self._pids = process_tree(self.child.pid)
        return self._pids

    def refresh_pids(self) -> list[int]:
        self._pids = []
        return self.pids()

    def alive(self) -> bool:
        return self.child is None or self.child.alive()

    def stderr_tail(self) -> str:
        """The end of the target's stderr and error log, less nginx's notices."""
        out = self.child.stderr_tail() if self.child is not None else ""
        if self.tmpdir:
            log = os.path.join(self.tmpdir, "error.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    out += f.read()[-4000:]
        # nginx's notices, and olb's line on the SIGTERM that ends every run, say nothing wrong.
        return "".join(line for line in out.splitlines(True)
                       if "[notice]" not in line and "stopping: 0 queued request(s) refused" not in line)

    def stop(self) -> None:
        if self.child is not None:
            # nginx: SIGTERM is its fast shutdown (SIGQUIT would wait for open connections).
            self.child.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass(frozen=True)
class TargetSpec:
    """One target of a comparison: a kind (direct, olb, nginx, haproxy, extra) and its worker count."""

    kind: str
    workers: int = 1
    extra_name: str = ""
    extra_cmd: str = ""

    @property
    def name(self) -> str:
        base = self.extra_name or self.kind
        return base if self.workers == 1 else f"{base} ×{self.workers}"

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.kind in ("nginx", "haproxy") and find_exe(self.kind) is None:
            return f"{self.kind} is not installed; to include it: {INSTALL_HINT}"
        if self.kind == "extra":
            exe = shlex.split(self.extra_cmd)[0] if self.extra_cmd.strip() else ""
            if not exe or (find_exe(exe) is None and not os.access(exe, os.X_OK)):
                return f"{self.extra_name}: {exe or 'empty command'!r} is not an executable"
        return None

    def start(self, backends: list[tuple[str, int]], max_conns: int, tmp: str,
              wrap: tuple[str, ...] = ()) -> Running:
        """Start the target in front of `backends`, sized for `max_conns` concurrent client connections.

        `wrap`: a command the target runs under (`valgrind --tool=callgrind ...`: bench/count.py);
        only for the Python targets, olb and floor.
        """
        if self.kind == "direct":
            return Running(self.name, self.kind, 1, list(backends))
        if wrap:
            if self.kind not in ("olb", "olb-obs", "floor"):
                raise ValueError(f"{self.kind} cannot run under {wrap[0]}")
            return {"floor": _start_floor}.get(self.kind, _start_olb)(self, backends, max_conns, tmp, wrap)
        start = {"olb": _start_olb, "olb-obs": _start_olb, "nginx": _start_nginx, "haproxy": _start_haproxy,
                 "floor": _start_floor, "extra": _start_extra}[self.kind]
        return start(self, backends, max_conns, tmp)


def parse_extra(text: str) -> TargetSpec:
    """`name=command with {listen} and {backends}` -> a TargetSpec (ValueError when malformed)."""
    name, sep, cmd = text.partition("=")
    name = name.strip()
    if not sep or not name or not cmd.strip():
        raise ValueError(f"--extra wants NAME=COMMAND, got {text!r}")
    if name in KINDS:
        raise ValueError(f"--extra: {name!r} is a built-in target; pick another name")
    if "{listen}" not in cmd and "{port}" not in cmd:
        raise ValueError(f"--extra {name}: the command must contain {{listen}} or {{port}}")
    return TargetSpec("extra", 1, name, cmd.strip())


def _listening_socket(backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    # O_NONBLOCK belongs to the open file, which the proxy shares.  nginx does not set it on a
    # socket it inherits (in a binary upgrade the old master's already has it): with two
    # workers, the one that loses the race for a connection would block in accept() with its
    # own connections stalled, until nginx's shutdown SIGKILLs it.
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def _private_dir(tmp: str, name: str) -> str:
    path = os.path.join(tmp, name.replace(" ", "").replace("×", "x"))
    os.makedirs(path, exist_ok=True)
    # nginx's workers drop to the `user` of the configuration; make the directory theirs to write.
    os.chmod(path, 0o755)
    return path


# --- olb -----------------------------------------------------------------------------------------


def _start_olb(spec: TargetSpec, backends, max_conns: int, tmp: str, wrap: tuple[str, ...] = ()) -> Running:
    observe = spec.kind == "olb-obs"
    env = dict(os.environ,
               OLB_BACKENDS=",".join(f"http://{h}:{p};max={max_conns}" for h, p in backends),
               OLB_LISTEN="127.0.0.1:0", OLB_WORKERS=str(spec.workers), OLB_HEALTH_INTERVAL="0",
               OLB_GPU_POLL="0", OLB_MAX_INFLIGHT=str(max_conns), OLB_LOG_LEVEL="warning",
               OLB_ADMIN_LISTEN="127.0.0.1:0",
               OLB_METRICS="on" if observe else "off", OLB_LOG_FORMAT="text",
               OLB_ACCESS_LOG=os.path.join(_private_dir(tmp, spec.name), "access.log") if observe else "off")
    # Two lines: the data port, then the admin listener's (/olb/status).
    child = Child([*wrap, sys.executable, "-m", "olb"], env, rb"(?:listening|admin) on http://(\S+)", 2)
    host, port = child.found[0].rsplit(":", 1)
    admin_host, admin_port = child.found[1].rsplit(":", 1)
    return Running(spec.name, spec.kind, spec.workers, [(host, int(port))], child=child,
                   admin=(admin_host, int(admin_port)))


def _start_floor(spec: TargetSpec, backends, max_conns: int, tmp: str, wrap: tuple[str, ...] = ()) -> Running:
    child = Child([*wrap, sys.executable, "-m", "bench.floor", "--listen", "127.0.0.1:0",
                   "--backends", ",".join(f"{h}:{p}" for h, p in backends)], None,
                  rb"floor listening on http://(\S+)", 1)
    host, port = child.found[0].rsplit(":", 1)
    return Running(spec.name, spec.kind, 1, [(host, int(port))], child=child)


# --- nginx ---------------------------------------------------------------------------------------


def nginx_conf(prefix: str, port: int, backends, workers: int, max_conns: int) -> str:
    """nginx as a reverse proxy for LLM streams: one (or `workers`) worker, least_conn, keep-alive."""
    user = ""
    if os.geteuid() == 0:
        # As root, nginx would switch its workers to `nobody`; keep them ours, as an unprivileged run.
        import grp
        import pwd

        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    servers = "\n".join(f"        server {h}:{p};" for h, p in backends)
    conns = max(1024, 3 * max_conns)
    return f"""# generated by bench/targets.py
{user}worker_processes {workers};
worker_rlimit_nofile {2 * conns};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections {conns};
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;

    upstream ollama {{
        least_conn;
{servers}
        keepalive {max(64, max_conns)};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Ollama bound to 127.0.0.1 answers 403 to a Host it does not know: pass the client's.
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


def _start_nginx(spec: TargetSpec, backends, max_conns: int, tmp: str) -> Running:
    prefix = _private_dir(tmp, spec.name)
    sock = _listening_socket(4096)
    port = sock.getsockname()[1]
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(prefix, port, backends, spec.workers, max_conns))
    fd = sock.fileno()
    env = dict(os.environ, NGINX=f"{fd};")
    child = Child([find_exe("nginx"), "-p", prefix + "/", "-e", os.path.join(prefix, "error.log"),
                   "-c", conf, "-g", "daemon off;"], env, pass_fds=(fd,))
    return Running(spec.name, "nginx", spec.workers, [("127.0.0.1", port)], child=child,
                   tmpdir=prefix, sock=sock)


# --- HAProxy -------------------------------------------------------------------------------------


def haproxy_cfg(fd: int, backends, threads: int, max_conns: int) -> str:
    """HAProxy in HTTP mode: one thread (or `threads`), leastconn, keep-alive on both sides."""
    servers = "\n".join(f"    server s{i} {h}:{p}" for i, (h, p) in enumerate(backends))
    conns = max(1024, 3 * max_conns)
    return f"""# generated by bench/targets.py
global
    nbthread {threads}
    maxconn {conns}

defaults
    mode http
    # Keep-alive on both sides is HAProxy's default (option http-keep-alive);
    # no `option http-server-close`, which would close every backend connection.
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 30s
    # Send each token as it comes.  Without this HAProxy passes MSG_MORE while it forwards a
    # body it knows is not over, and the kernel may hold a token back for up to 200 ms (with
    # 20 ms tokens this run measured +206 ms on every time to first token).
    option http-no-delay

frontend ollama
    bind fd@{fd}
    maxconn {conns}
    default_backend ollama

backend ollama
    balance leastconn
    http-reuse always
{servers}
"""


def _start_haproxy(spec: TargetSpec, backends, max_conns: int, tmp: str) -> Running:
    prefix = _private_dir(tmp, spec.name)
    sock = _listening_socket(4096)
    fd = sock.fileno()
    cfg = os.path.join(prefix, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(haproxy_cfg(fd, backends, spec.workers, max_conns))
    # -db: foreground, no daemon; -q: no startup chatter.
    child = Child([find_exe("haproxy"), "-f", cfg, "-db", "-q"], None, pass_fds=(fd,), cwd=prefix)
    return Running(spec.name, "haproxy", spec.workers, [("127.0.0.1", sock.getsockname()[1])],
                   child=child, tmpdir=prefix, sock=sock)


# --- anything else -------------------------------------------------------------------------------


def _start_extra(spec: TargetSpec, backends, max_conns: int, tmp: str) -> Running:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    values = {
        "listen": f"127.0.0.1:{port}", "host": "127.0.0.1", "port": str(port),
        "backends": ",".join(f"{h}:{p}" for h, p in backends),
        "backend_urls": ",".join(f"http://{h}:{p}" for h, p in backends),
        "tmp": _private_dir(tmp, spec.name),
    }
    try:
        argv = [part.format_map(values) for part in shlex.split(spec.extra_cmd)]
    except KeyError as exc:
        raise ValueError(f"--extra {spec.extra_name}: unknown placeholder {exc}; known: "
                         + ", ".join("{" + k + "}" for k in values)) from None
    child = Child(argv, None, cwd=values["tmp"])
    return Running(spec.name, "extra", 1, [("127.0.0.1", port)], child=child)


async def wait_ready(running: Running, timeout: float = READY_TIMEOUT) -> None:
    """Until GET /api/version through the target answers 200 (a listening socket is not enough)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not running.alive():
            raise RuntimeError(f"{running.name} exited at start:\n{running.stderr_tail()}")
        for host, port in running.addresses:
            try:
                status, _body = await http_get(host, port, "/api/version", timeout=2.0)
            except (OSError, asyncio.TimeoutError, ConnectionError, ValueError) as exc:
                last = repr(exc)
                break
            if status != 200:
                last = f"status {status}"
                break
        else:
            running.refresh_pids()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{running.name} did not answer within {timeout:g} s ({last}):\n"
                       f"{running.stderr_tail()}")
