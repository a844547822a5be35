"""Build fastnat: the compiled multiplexer core, or a pure-Python install.

``FASTNAT_NO_EXTENSIONS=1`` builds a pure-Python package (a ``py3-none-any``
wheel) that needs no compiler. Otherwise ``src/fastnat/_mux.pyx`` is compiled
with Cython into ``fastnat._mux``, and a failed compile fails the build: a
compiled build never quietly degrades to the pure engine.
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("FASTNAT_NO_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS:
    print("fastnat build: pure-Python (FASTNAT_NO_EXTENSIONS is set; no compiled engine)", file=sys.stderr)
    ext_modules = []
else:
    from Cython.Build import cythonize

    print("fastnat build: compiled engine fastnat._mux (set FASTNAT_NO_EXTENSIONS=1 for pure Python)", file=sys.stderr)
    ext_modules = cythonize(
        [Extension("fastnat._mux", ["src/fastnat/_mux.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=os.environ.get("FASTNAT_CYTHON_ANNOTATE", "") not in ("", "0"),
    )

setup(ext_modules=ext_modules)
