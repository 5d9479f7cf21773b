"""The model catalogue: what a simulated Ollama has "installed".

Rules for this module: pure data and name handling, no IO, no clock reads
(callers pass times in).  The GPU model (gpu.py) reads sizes and KV geometry
from ModelSpec, so keep those fields truthful.

Model names follow Ollama's `types/model/name.go` (ParseName, DisplayShortest):
`[host/][namespace/]model[:tag][+build][@digest]`, parsed right to left,
filled with `registry.ollama.ai/library/?:latest`, compared
case-insensitively.  /api/tags and /api/ps print the display-shortest form,
which drops the default host and namespace but always keeps the tag:
`llama3.2` -> `llama3.2:latest`, `registry.ollama.ai/library/llama3.2` ->
`llama3.2:latest`, `hf.co/bartowski/x:Q4` stays as it is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# name.go MaxNamePartLen: longer strings are not valid names at all.
MAX_NAME_LEN = 128

_VALID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_VALID_NAMESPACE = _VALID - {"."}

# GGUF general.file_type codes for the quantisations we use.
_FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}
# ggml.FileType names by code (fs/ggml/type.go), for uploaded GGUFs.
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                   10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
                   16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

# Where Ollama keeps blobs and manifests (the texts of its "no such file" errors).
MODELS_DIR = "/root/.ollama/models"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True, slots=True)
class ModelName:
    """A parsed, default-filled model name; casing kept as the client sent it."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """Case-insensitive identity (Name.EqualFold)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    @property
    def full(self) -> str:
        """Name.String() without build: `registry.ollama.ai/library/x:latest`."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def display(self) -> str:
        """DisplayShortest, tag kept: drop the default host, then namespace."""
        if self.host.lower() != DEFAULT_HOST:
            return self.full
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def _valid_part(part: str, namespace: bool = False) -> bool:
    if not part:
        return False
    allowed = _VALID_NAMESPACE if namespace else _VALID
    return all(c in allowed for c in part)


def parse_name(s: str) -> ModelName | None:
    """Parse like name.go ParseName(s, FillDefault); None if invalid.

    Invalid: empty, longer than 128, `..`, characters outside
    [A-Za-z0-9_.-], a dot in the namespace, more than three `/`-parts, or an
    empty part.  The build (`+Q4_0`) and digest (`@sha256-...`) parts are
    validated and then dropped: the simulator keys models by name only.
    """
    if not isinstance(s, str):
        return None
    if s.startswith("http://"):
        s = s[7:]
    elif s.startswith("https://"):
        s = s[8:]
    if not s or len(s) > MAX_NAME_LEN or ".." in s:
        return None
    if "@" in s:
        s, digest = s.rsplit("@", 1)
        if "@" in s or not _valid_digest(digest):
            return None
        if not s:
            return None
    if "+" in s:
        s, build = s.rsplit("+", 1)
        if "+" in s or not _valid_part(build):
            return None
    tag = ""
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > slash:
        s, tag = s[:colon], s[colon + 1:]
        if not _valid_part(tag):
            return None
    parts = s.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else ""
    host = parts[-3] if len(parts) == 3 else ""
    if not _valid_part(model):
        return None
    if len(parts) >= 2 and not _valid_part(namespace, namespace=True):
        return None
    if len(parts) == 3 and not _valid_part(host):
        return None
    return ModelName(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG)


def _valid_digest(d: str) -> bool:
    # types/model ParseDigest accepts "sha256-<64 hex>" and "sha256:<64 hex>".
    for sep in ("-", ":"):
        algo, _, hexpart = d.partition(sep)
        if algo == "sha256" and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart):
            return True
    return False


def normalize_name(s: str) -> str | None:
    """`llama3.2` -> `llama3.2:latest` (display-shortest), None if invalid."""
    n = parse_name(s)
    return n.display if n else None


@dataclass(frozen=True)
class ModelSpec:
    """One model's static facts (what the GGUF and manifest would say)."""

    name: str                   # display-shortest, e.g. "llama3.2:latest"
    architecture: str           # general.architecture, e.g. "llama"
    parameter_size: str         # details.parameter_size, e.g. "3.2B"
    parameter_count: int
    quantization_level: str     # e.g. "Q4_K_M"
    size: int                   # bytes on disk (/api/tags size)
    context_length: int         # training context (<arch>.context_length)
    embedding_length: int       # hidden size; also the embedding dimension
    block_count: int
    head_count: int
    head_count_kv: int
    feed_forward_length: int
    vocab_size: int
    capabilities: tuple = ("completion", "tools")
    families: tuple = ()
    # Relative decode speed (1.0 = SimConfig.token_rate; gpu.py's eval_rate
    # scales its rate by it too); every built-in model uses 1.0.
    speed: float = 1.0

    @property
    def family(self) -> str:
        return self.architecture

    @property
    def embedding_only(self) -> bool:
        return "completion" not in self.capabilities

    @property
    def digest(self) -> str:
        """Manifest digest: stable and unique per name (not the real one)."""
        return hashlib.sha256(b"olb-sim/" + self.name.encode()).hexdigest()

    @property
    def head_dim(self) -> int:
        return self.embedding_length // self.head_count

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V for every layer (llama.cpp's KV cache): 2 x layers x kv heads x head dim."""
        return 2 * self.block_count * self.head_count_kv * self.head_dim * bytes_per_element

    def details(self) -> dict:
        """api.ModelDetails, in Go field order."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.architecture,
            "families": list(self.families or (self.architecture,)),
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def model_info(self) -> dict:
        """The GGUF key/values /api/show returns (tokenizer arrays emptied,
        as Ollama does for arrays longer than 5 when not verbose)."""
        a = self.architecture
        info = {
            "general.architecture": a,
            "general.basename": self.name.split(":")[0].split("/")[-1],
            "general.file_type": _FILE_TYPES.get(self.quantization_level, 15),
            "general.parameter_count": self.parameter_count,
            "general.quantization_version": 2,
            "general.type": "model",
            f"{a}.attention.head_count": self.head_count,
            f"{a}.attention.head_count_kv": self.head_count_kv,
            f"{a}.attention.layer_norm_rms_epsilon": 1e-05,
            f"{a}.block_count": self.block_count,
            f"{a}.context_length": self.context_length,
            f"{a}.embedding_length": self.embedding_length,
            f"{a}.feed_forward_length": self.feed_forward_length,
            f"{a}.vocab_size": self.vocab_size,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.model": "bert" if self.embedding_only else "gpt2",
            "tokenizer.ggml.token_type": [],
            "tokenizer.ggml.tokens": [],
        }
        if self.embedding_only:
            info[f"{a}.pooling_type"] = 1
        else:
            info[f"{a}.rope.freq_base"] = 500000
            info["tokenizer.ggml.merges"] = []
        return info

    @property
    def template(self) -> str:
        if self.embedding_only:
            return "{{ .Prompt }}"
        return ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")

    @property
    def parameters(self) -> str:
        if self.embedding_only:
            return f"{'num_ctx':<30} {self.context_length}"
        return "\n".join(f"{'stop':<30} \"{s}\"" for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))


def _spec(name, arch, psize, pcount, quant, size, ctx, emb, blocks, heads, kv, ffn, vocab,
          caps=("completion", "tools")):
    return ModelSpec(name, arch, psize, pcount, quant, size, ctx, emb, blocks, heads, kv, ffn, vocab, caps)


# Sizes and geometry of the Ollama library's default tags (GGUF metadata as
# /api/show reports it; sizes from /api/tags of real installs, e.g. docs/api.md's example).
KNOWN_MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    _spec("llama3.2:latest", "llama", "3.2B", 3212749888, "Q4_K_M", 2019393189,
          131072, 3072, 28, 24, 8, 8192, 128256),
    _spec("llama3.2:1b", "llama", "1.2B", 1235814432, "Q8_0", 1321098329,
          131072, 2048, 16, 32, 8, 8192, 128256),
    _spec("llama3.1:8b", "llama", "8.0B", 8030261248, "Q4_K_M", 4920753328,
          131072, 4096, 32, 32, 8, 14336, 128256),
    _spec("llama3.1:70b", "llama", "70.6B", 70553706496, "Q4_K_M", 42520413916,
          131072, 8192, 80, 64, 8, 28672, 128256),
    _spec("qwen2.5:7b", "qwen2", "7.6B", 7615616512, "Q4_K_M", 4683087332,
          32768, 3584, 28, 28, 4, 18944, 152064),
    _spec("qwen2.5:0.5b", "qwen2", "494.03M", 494032768, "Q4_K_M", 397821319,
          32768, 896, 24, 14, 2, 4864, 151936),
    _spec("mistral:latest", "llama", "7.2B", 7248023552, "Q4_K_M", 4372824384,
          32768, 4096, 32, 32, 8, 14336, 32768),
    _spec("nomic-embed-text:latest", "nomic-bert", "137M", 136727040, "F16", 274302450,
          2048, 768, 12, 12, 12, 3072, 30522, caps=("embedding",)),
    _spec("all-minilm:latest", "bert", "23M", 22565376, "F16", 45960996,
          512, 384, 6, 12, 12, 1536, 30522, caps=("embedding",)),
)}


@dataclass(frozen=True, slots=True)
class Layer:
    """One manifest layer (manifest.Layer): a blob with a media type."""

    media_type: str
    digest: str                 # "sha256:<hex>"
    size: int

    def manifest_entry(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Blob:
    """One stored blob: its size and, for a GGUF, the header's key/values."""

    size: int
    gguf: bool = False
    kv: dict | None = None
    data: bytes | None = None   # the content of a small text layer (template, params, ...)


def blob_key(digest: str) -> str:
    """manifest.BlobsPath's file name: `sha256:x` and `sha256-x` are one blob."""
    return digest.replace(":", "-", 1)


def blob_path(digest: str) -> str:
    return f"{MODELS_DIR}/blobs/{blob_key(digest)}"


def model_layer_digest(name: str) -> str:
    """The weights layer of a built-in model (stable per name, not the real one)."""
    return "sha256:" + hashlib.sha256(b"olb-sim-layer/" + name.encode()).hexdigest()


def manifest_digest(config: Layer | None, layers) -> str:
    """sha256 of the manifest file as manifest.WriteManifest writes it."""
    m = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
         "config": config.manifest_entry() if config else {"mediaType": "", "digest": "", "size": 0},
         "layers": [x.manifest_entry() for x in layers]}
    return hashlib.sha256(json.dumps(m, separators=(",", ":")).encode()).hexdigest()


@dataclass(slots=True)
class Installed:
    """A model as installed on one instance (a copy shares its spec and layers)."""

    name: ModelName
    spec: ModelSpec
    modified: float             # unix seconds
    digest: str = ""
    # Manifest layers; a built-in model has one weights layer of spec.size.
    layers: tuple = ()
    config: Layer | None = None

    def __post_init__(self):
        if not self.layers:
            self.layers = (Layer(MEDIA_MODEL, model_layer_digest(self.spec.name), self.spec.size),)
        if not self.digest:
            self.digest = self.spec.digest

    @property
    def size(self) -> int:
        """manifest.Size: every layer and the config (/api/tags size)."""
        return sum(x.size for x in self.layers) + (self.config.size if self.config else 0)

    def all_layers(self) -> tuple:
        return self.layers + ((self.config,) if self.config else ())

    @property
    def manifest_path(self) -> str:
        n = self.name
        return f"{MODELS_DIR}/manifests/{n.host}/{n.namespace}/{n.model}/{n.tag}"

    @property
    def blob_path(self) -> str:
        """The model's weights file (Ollama's ModelPath; the scheduler's
        tie-break when it picks an eviction victim, sched.go ByDurationAndName)."""
        return "/root/.ollama/models/blobs/sha256-" + hashlib.sha256(self.digest.encode()).hexdigest()


@dataclass
class Catalogue:
    """The installed models and stored blobs of one instance; /api/pull,
    create, copy, delete and the blob endpoints change it."""

    installed: dict = field(default_factory=dict)     # key -> Installed
    blobs: dict = field(default_factory=dict)         # blob_key(digest) -> Blob

    @classmethod
    def from_models(cls, models, base_time: float) -> "Catalogue":
        """Install `models` (names from KNOWN_MODELS or ModelSpecs), the first
        the most recently modified, one day apart before `base_time`."""
        cat = cls()
        for i, m in enumerate(models):
            spec = m if isinstance(m, ModelSpec) else known_spec(m)
            if spec is None:
                raise ValueError(f"unknown model {m!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
            cat.install(spec, base_time - 86400.0 * i - 60.0 * i)
        return cat

    def install(self, spec: ModelSpec, modified: float, name: ModelName | None = None,
                layers: tuple = (), config: Layer | None = None, digest: str = "") -> Installed:
        """Write a manifest: the model's layers become stored blobs."""
        name = name or parse_name(spec.name)
        assert name is not None  # a spec's name is a valid one
        entry = Installed(name, spec, modified, digest, layers, config)
        self.installed[name.key] = entry
        for layer in entry.all_layers():
            self.blobs.setdefault(blob_key(layer.digest), Blob(layer.size))
        return entry

    def lookup(self, name: ModelName) -> Installed | None:
        return self.installed.get(name.key)

    def remove(self, name: ModelName) -> bool:
        """Delete the manifest, then every layer no other manifest uses
        (Manifest.Remove + RemoveLayers)."""
        entry = self.installed.pop(name.key, None)
        if entry is None:
            return False
        self.prune(entry.all_layers())
        return True

    def prune(self, layers) -> None:
        """Layer.Remove for each of `layers`: drop the blob unless a manifest uses it."""
        used = {blob_key(x.digest) for e in self.installed.values() for x in e.all_layers()}
        for layer in layers:
            if blob_key(layer.digest) not in used:
                self.blobs.pop(blob_key(layer.digest), None)

    def listing(self) -> list:
        """Installed models, most recently modified first (ListHandler)."""
        return sorted(self.installed.values(), key=lambda e: -int(e.modified))

    def blob(self, digest: str) -> Blob | None:
        return self.blobs.get(blob_key(digest))

    def add_blob(self, digest: str, blob: Blob) -> None:
        self.blobs[blob_key(digest)] = blob


def human_number(n: int) -> str:
    """format.HumanNumber: details.parameter_size of a created model."""
    for unit, suffix, fmt in ((1_000_000_000, "B", "{:.1f}"), (1_000_000, "M", "{:.2f}"),
                              (1_000, "K", "{:.0f}")):
        if n >= unit:
            x = n / unit
            return (f"{x:.0f}" if x == int(x) else fmt.format(x)) + suffix
    return str(n)


def spec_from_gguf(name: str, size: int, kv: dict) -> ModelSpec:
    """A simulated spec for an uploaded GGUF: its metadata where present,
    the rest from the built-in model nearest in file size (same kind:
    an embedding model when the GGUF has a pooling type)."""
    arch = kv.get("general.architecture") if isinstance(kv.get("general.architecture"), str) else ""
    embedding = f"{arch}.pooling_type" in kv or arch in ("bert", "nomic-bert")
    pool = [s for s in KNOWN_MODELS.values() if s.embedding_only == embedding]
    base = min(pool, key=lambda s: abs(s.size - size))

    def num(key, default):
        v = kv.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

    count = num("general.parameter_count", max(1, round(size * base.parameter_count / base.size)))
    quant = FILE_TYPE_NAMES.get(kv.get("general.file_type"), base.quantization_level)  # type: ignore[arg-type]  # not an int: the default
    a = arch or base.architecture
    return ModelSpec(
        name=name, architecture=a, parameter_size=human_number(count), parameter_count=count,
        quantization_level=quant, size=size,
        context_length=num(f"{a}.context_length", base.context_length),
        embedding_length=num(f"{a}.embedding_length", base.embedding_length),
        block_count=num(f"{a}.block_count", base.block_count),
        head_count=num(f"{a}.attention.head_count", base.head_count),
        head_count_kv=num(f"{a}.attention.head_count_kv", base.head_count_kv),
        feed_forward_length=num(f"{a}.feed_forward_length", base.feed_forward_length),
        vocab_size=num(f"{a}.vocab_size", base.vocab_size),
        capabilities=base.capabilities)


def known_spec(name: str) -> ModelSpec | None:
    """A built-in model by any spelling of its name (for /api/pull)."""
    n = parse_name(name)
    if n is None:
        return None
    for spec in KNOWN_MODELS.values():
        if parse_name(spec.name).key == n.key:  # type: ignore[union-attr]  # built-in names parse
            return spec
    return None
