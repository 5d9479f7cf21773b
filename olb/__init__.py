"""olb: a load balancer for Ollama and other LLM inference servers.

Where a request goes (read in this order; the design is in docs/:
scheduling.md, management.md, operations.md, performance.md). The modules
with a .pxd beside them (those a request passes through) are Python
compiled by Cython, the .pxd declaring their classes' layout
(docs/performance.md); the .pyx modules are Cython proper.

    olb/__main__.py   the `olb-fast` command: configuration, workers
    olb/config.py     OLB_* variables and flags -> Config
    olb/server.py     one worker: listening socket, balancer, background tasks
    olb/lifecycle.py  reload (SIGHUP), graceful stop (SIGTERM), hand-over
    olb/proxy.py      the IO shell: ClientSideProtocol <-> BackendSideProtocol
    olb/resume.py     continuing a chat stream whose backend died (docs/operations.md)
    olb/http.py       sans-IO HTTP: request heads in (h11 + a compiled fast path), bytes out
    olb/hostcheck.py  Ollama's Host check (DNS rebinding) on a loopback listener
    olb/slowclient.py slow and hostile clients: a partial request's deadline, held body bytes
    olb/flow.py       flow control between the two sides of a proxied request
    olb/balancer.py   backend choice (olb/_core.pyx), admission queue, health, drain
    olb/routing.py    the placement rules: state in, a decision out (docs/scheduling.md)
    olb/fairqueue.py  the queue's fair order across clients and priorities
    olb/pool.py       keep-alive backend connections
    olb/client.py     the control-plane HTTP client (olb asking a backend something)
    olb/models.py     what each backend has installed and loaded (model routing)
    olb/manage.py     model management across the cluster (pull, create, delete, blobs, ...)
    olb/_core.pyx     compiled: the backend table (selection and in-flight counts)
    olb/_http.pyx     compiled: request-head fast path, backend response head, upstream head, body-end scanner
    olb/_relay.pyx    compiled: the per-chunk path of a response (base of BackendSideProtocol)
    olb/_tokens.pyx   compiled: the token counts at a response's end (metrics.read_tokens)
    olb/_body.pyx     compiled: the members routing reads in a request body, found without decoding it
    olb/gpu.py        NVML polling -> GPU loads pushed into the core
    olb/telemetry.py  DCGM-format /metrics scraping for remote GPUs
    olb/admin.py      /olb/status, /olb/health, /olb/drain, /metrics, the dashboard: the admin gate
    olb/auth.py       API keys and their limits (OLB_API_KEYS), the admin token
    olb/dashboard.py  the dashboard's samples and events (the page: olb/dashboard.html)
    olb/metrics.py    Prometheus metrics: counters on the request path, the page at scrape time
    olb/accesslog.py  the access log (OLB_ACCESS_LOG) and the log format (OLB_LOG_FORMAT)
    olb/errors.py     error types, each with its HTTP status
    olb/local.py      errors of this machine (EMFILE...): olb's fault, never a backend's
    olb/agent.py      `olb-agent`: an NVML exporter with dcgm-exporter's names
    olb/sim/          the simulated Ollama used by tests, demo and benchmarks
"""

__version__ = "0.1.0"
