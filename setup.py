"""Build olb's compiled core.

The recipe follows uvloop's and httptools' setup.py: a build_ext subclass that
always cythonizes from the .pyx (the generated C is not committed) and takes
--cython-annotate / --cython-directives for debugging builds, e.g.

    python setup.py build_ext --inplace --cython-annotate
    python setup.py build_ext --inplace --cython-directives=linetrace=True
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-annotate", None, "write an annotated HTML next to each .pyx"),
        ("cython-directives=", None, "extra Cython directives, e.g. linetrace=True"),
    ]
    boolean_options = _build_ext.boolean_options + ["cython-annotate"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_annotate = False
        self.cython_directives = None

    def finalize_options(self):
        # Cythonize here rather than at import time so that `pip install .`
        # only needs Cython inside the isolated build environment.
        from Cython.Build import cythonize

        directives = {
            "language_level": "3",
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        }
        if self.cython_directives:
            for item in self.cython_directives.split(","):
                key, _, value = item.partition("=")
                directives[key.strip()] = value.strip() not in ("0", "False", "false", "")
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(self.cython_annotate),
        )
        super().finalize_options()


#: Cython proper: the compiled core.
PYX = ["_body", "_core", "_http", "_relay", "_tokens"]
#: Python modules compiled in Cython's pure-Python mode, each with a .pxd
#: beside it (docs/performance.md); each keeps Python's semantics with the
#: directives in its first line, which override the .pyx ones above.
PURE = ["http", "models", "routing", "proxy", "slowclient", "pool", "hostcheck", "dashboard", "manage",
        "fairqueue", "balancer", "metrics", "accesslog", "admin"]

setup(
    ext_modules=[
        Extension(f"olb.{name}", [f"olb/{name}.pyx"], extra_compile_args=["-O2"]) for name in PYX
    ] + [
        Extension(f"olb.{name}", [f"olb/{name}.py"], extra_compile_args=["-O2"]) for name in PURE
    ],
    cmdclass={"build_ext": build_ext},
)
