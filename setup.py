"""The one compiled piece: the gRPC server's receive loop in C (optional; pure Python when no compiler is
there). Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "runtime.serving.protocol._h2fast",
            ["runtime/serving/protocol/_h2fast.c"],
            py_limited_api=True,
            extra_compile_args=["-O2"],
            optional=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
