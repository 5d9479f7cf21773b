"""The .pyi stubs of the compiled modules say what the compiled modules have.

A type checker reads olb/_body.pyi, _core.pyi, _http.pyi, _relay.pyi and _tokens.pyi instead of the
.pyx, so a stub that drifts from its .pyx misleads it silently. Here each
compiled module is read back (the modules are built with embedsignature=True,
so every function carries its Cython signature, C types included) and
compared with its stub, parsed with ast: the same public names, and for
each function and method the same parameters, kinds, defaults, and an
annotation that matches each C-typed parameter.

Names a stub defines for annotations only (a type alias, a TypedDict) have
no runtime object and are not compared; nor are names with a leading
underscore (Relay's _read_head & co. are the subclass's to define).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re
import types

import pytest

import olb

PACKAGE = pathlib.Path(olb.__file__).parent
COMPILED = ["_body", "_core", "_http", "_relay", "_tokens"]

#: What a C-typed parameter of the .pyx is in Python's terms.
C_TYPES = {"Py_ssize_t": "int", "int64_t": "int", "uint64_t": "int", "int": "int", "long": "int",
           "double": "float", "float": "float", "bint": "bool", "bool": "bool",
           "str": "str", "bytes": "bytes"}

NO_DEFAULT = "<no default>"
POSITIONAL, KEYWORD = "positional", "keyword-only"


# --- the stub's side ----------------------------------------------------------------------

def _stub_params(args: ast.arguments, method: bool) -> list[tuple]:
    """(name, kind, default, annotation) per parameter, `self` left out."""
    positional = args.posonlyargs + args.args
    defaults = [NO_DEFAULT] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults]
    params = [(a.arg, POSITIONAL, d, a.annotation and ast.unparse(a.annotation))
              for a, d in zip(positional, defaults, strict=True)]
    params += [(a.arg, KEYWORD, NO_DEFAULT if d is None else ast.literal_eval(d),
                a.annotation and ast.unparse(a.annotation))
               for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    return params[1:] if method else params


def _is_typeddict(node: ast.ClassDef) -> bool:
    return any(ast.unparse(base).endswith("TypedDict") for base in node.bases)


def stub_api(source: str) -> dict:
    """{name: ("function", params) | ("class", members) | ("value", None)}."""
    api: dict = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            api[node.name] = ("function", _stub_params(node.args, method=False))
        elif isinstance(node, ast.AnnAssign) and not node.target.id.startswith("_"):
            api[node.target.id] = ("value", ast.unparse(node.annotation))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not _is_typeddict(node):
            members: dict = {"__init__": ("method", [])}  # no __init__ in a stub: takes no argument
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    decorators = {ast.unparse(d) for d in item.decorator_list}
                    if "property" in decorators:
                        members[item.name] = ("attribute", item.returns and ast.unparse(item.returns))
                    elif item.name == "__init__" or not item.name.startswith("_"):
                        members[item.name] = ("method", _stub_params(item.args, method=True))
                elif isinstance(item, ast.AnnAssign) and not item.target.id.startswith("_"):
                    members[item.target.id] = ("attribute", ast.unparse(item.annotation))
            api[node.name] = ("class", members)
        # A plain assignment (`RequestHead = tuple[...]`) is a type alias: no runtime name.
    return api


# --- the compiled side --------------------------------------------------------------------

def _split_params(text: str) -> list[str]:
    """Split an embedded signature's parameter list at its top-level commas."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def embedded_signature(doc: str | None, name: str) -> list[tuple] | None:
    """(name, kind, default, C type or None) per parameter of the signature
    Cython put on the docstring's first line (`name(...)`), `self` left out;
    None when there is none."""
    first = (doc or "").split("\n", 1)[0]
    m = re.fullmatch(rf"{re.escape(name)}\((.*)\)(?: -> .*)?", first)
    if m is None:
        return None
    params, kind = [], POSITIONAL
    for part in _split_params(m.group(1)):
        if part == "*":
            kind = KEYWORD
            continue
        if part == "/":
            continue
        decl, eq, default = part.partition("=")
        *ctype, pname = decl.split()
        if pname == "self":
            continue
        params.append((pname, kind, ast.literal_eval(default) if eq else NO_DEFAULT,
                       " ".join(ctype) or None))
    return params


def _callable_params(fn, qualname: str) -> list[tuple]:
    """A compiled function's parameters: kinds and defaults from the function
    itself, C types from its embedded signature."""
    ctypes = {p[0]: p[3] for p in embedded_signature(fn.__doc__, qualname) or []}
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        kind = KEYWORD if p.kind is p.KEYWORD_ONLY else POSITIONAL
        default = NO_DEFAULT if p.default is p.empty else p.default
        params.append((p.name, kind, default, ctypes.get(p.name)))
    return params


def _max_positional(cls) -> int | None:
    """How many positional arguments the class's constructor takes, from the
    TypeError that one too many raises (None: it accepts any)."""
    try:
        cls(*[None] * 64)
    except TypeError as exc:
        m = re.search(r"takes (?:at most|exactly) (\d+) positional argument", str(exc))
        if m:
            return int(m.group(1))
        raise
    return None


def _constructor_params(cls) -> list[tuple]:
    params = embedded_signature(cls.__doc__, cls.__name__)
    if params is None:  # no __init__ of its own
        return []
    # Cython 3.3 places the `*` of a cdef class's __init__ one parameter too
    # late in the class docstring (the dropped `self` still counted), so the
    # keyword-only boundary comes from the constructor itself.
    positional = _max_positional(cls)
    return [(name, POSITIONAL if positional is None or i < positional else KEYWORD, default, ctype)
            for i, (name, _, default, ctype) in enumerate(params)]


def _attribute_type(descriptor, name: str) -> str | None:
    """The Python type of a `cdef public` attribute, from the `name: type`
    docstring Cython gives it; None for a property or an untyped object."""
    m = re.fullmatch(rf"{re.escape(name)}: '?([\w.]+)'?", descriptor.__doc__ or "")
    if m is None or m.group(1) == "object":
        return None
    return C_TYPES.get(m.group(1), m.group(1).rsplit(".", 1)[-1])


def compiled_api(module) -> dict:
    api: dict = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if inspect.isclass(obj):
            members = {"__init__": ("method", _constructor_params(obj))}
            for mname, member in vars(obj).items():
                if mname.startswith("_"):
                    continue
                if inspect.isdatadescriptor(member):
                    members[mname] = ("attribute", _attribute_type(member, mname))
                elif callable(member):
                    members[mname] = ("method", _callable_params(member, f"{name}.{mname}"))
            api[name] = ("class", members)
        elif callable(obj):
            api[name] = ("function", _callable_params(obj, name))
        else:
            api[name] = ("value", type(obj).__name__)
    return api


# --- comparing ----------------------------------------------------------------------------

def _compare_params(where: str, compiled: list[tuple], stub: list[tuple]) -> list[str]:
    if [p[:3] for p in compiled] != [p[:3] for p in stub]:
        return [f"{where}: compiled {[p[:3] for p in compiled]} != stub {[p[:3] for p in stub]}"]
    diffs = []
    for (pname, _, _, ctype), (_, _, _, annotation) in zip(compiled, stub, strict=True):
        if ctype in C_TYPES and annotation != C_TYPES[ctype]:
            diffs.append(f"{where}({pname}): {ctype} in the .pyx, annotated {annotation!r} in the stub")
    return diffs


def differences(compiled: dict, stub: dict) -> list[str]:
    diffs = []
    for name in sorted(compiled.keys() | stub.keys()):
        if name not in stub:
            diffs.append(f"{name}: in the compiled module, not in the stub")
            continue
        if name not in compiled:
            diffs.append(f"{name}: in the stub, not in the compiled module")
            continue
        (ckind, cdetail), (skind, sdetail) = compiled[name], stub[name]
        if ckind != skind:
            diffs.append(f"{name}: a {ckind} compiled, a {skind} in the stub")
        elif ckind == "value" and not re.search(rf"\b{cdetail}\b", sdetail):
            diffs.append(f"{name}: a {cdetail} compiled, annotated {sdetail!r} in the stub")
        elif ckind == "function":
            diffs += _compare_params(name, cdetail, sdetail)
        elif ckind == "class":
            for member in sorted(cdetail.keys() | sdetail.keys()):
                where = f"{name}.{member}"
                if member not in sdetail or member not in cdetail:
                    diffs.append(f"{where}: only in the {'compiled module' if member in cdetail else 'stub'}")
                elif cdetail[member][0] != sdetail[member][0]:
                    diffs.append(f"{where}: a {cdetail[member][0]} compiled, a {sdetail[member][0]} in the stub")
                elif cdetail[member][0] == "method":
                    diffs += _compare_params(where, cdetail[member][1], sdetail[member][1])
                elif cdetail[member][1] is not None and cdetail[member][1] != sdetail[member][1]:
                    diffs.append(f"{where}: a {cdetail[member][1]} compiled, annotated "
                                 f"{sdetail[member][1]!r} in the stub")
    return diffs


@pytest.mark.parametrize("name", COMPILED)
def test_stub_matches_the_compiled_module(name):
    module = importlib.import_module(f"olb.{name}")
    stub = stub_api((PACKAGE / f"{name}.pyi").read_text(encoding="utf-8"))
    assert differences(compiled_api(module), stub) == []


def test_every_compiled_module_has_a_stub_and_the_package_is_typed():
    built = {p.name.split(".")[0] for p in PACKAGE.glob("*.pyx")}
    assert built == set(COMPILED)
    assert {p.stem for p in PACKAGE.glob("*.pyi")} == built
    # PEP 561: without py.typed a type checker ignores the package's types.
    assert (PACKAGE / "py.typed").is_file()


# --- the comparison finds drift -------------------------------------------------------------

CORE_STUB = (PACKAGE / "_core.pyi").read_text(encoding="utf-8")


@pytest.mark.parametrize("old,new,needle", [
    # a parameter renamed
    ("def release(self, index: int)", "def release(self, i: int)", "BackendTable.release"),
    # a default changed
    ("bound: float = 1.25", "bound: float = 1.5", "BackendTable.acquire_affine"),
    # a positional parameter made keyword-only
    ("weights: Sequence[float] | None = None,\n        *,", "*,\n        weights: Sequence[float] | None = None,",
     "BackendTable.__init__"),
    # a C-typed parameter annotated as something else
    ("def set_health(self, index: int, healthy: bool)", "def set_health(self, index: int, healthy: int)",
     "BackendTable.set_health(healthy)"),
    # a method the compiled class does not have
    ("    def snapshot(self)", "    def drain(self) -> None: ...\n    def snapshot(self)", "BackendTable.drain"),
    # a function left out
    ("def shared_size(n_backends: int, n_workers: int) -> int:",
     "def _shared_size(n_backends: int, n_workers: int) -> int:", "shared_size"),
    # an attribute made a method
    ("    @property\n    def n(self) -> int:", "    def n(self) -> int:", "BackendTable.n"),
    # a constant of another type
    ("NO_BACKEND: Final[int]", "NO_BACKEND: Final[str]", "NO_BACKEND"),
])
def test_a_stub_that_drifted_is_caught(old, new, needle):
    assert CORE_STUB.count(old) == 1
    import olb._core

    diffs = differences(compiled_api(olb._core), stub_api(CORE_STUB.replace(old, new)))
    assert any(d.startswith(needle) for d in diffs), diffs


def test_a_public_attribute_of_another_type_is_caught():
    import olb._relay

    stub = (PACKAGE / "_relay.pyi").read_text(encoding="utf-8")
    for old, new in [("last_io: float", "last_io: int"), ("scanner: BodyScanner", "scanner: object")]:
        assert stub.count(old) == 1
        diffs = differences(compiled_api(olb._relay), stub_api(stub.replace(old, new)))
        assert [d.split(":")[0] for d in diffs] == [f"Relay.{new.split(':')[0]}"], diffs


@pytest.mark.parametrize("doc,name,params", [
    ("f(a, Py_ssize_t b=0, *, str c='x, y')", "f",
     [("a", POSITIONAL, NO_DEFAULT, None), ("b", POSITIONAL, 0, "Py_ssize_t"), ("c", KEYWORD, "x, y", "str")]),
    ("C.m(self, data) -> int\nMore text.", "C.m", [("data", POSITIONAL, NO_DEFAULT, None)]),
    ("g()", "g", []),
    ("Prose, not a signature.", "g", None),
])
def test_embedded_signature(doc, name, params):
    assert embedded_signature(doc, name) == params
