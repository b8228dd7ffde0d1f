import importlib.util
import json
import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithXlaHeaders(build_ext):
    """The CPU kernel includes XLA's FFI headers, which jaxlib ships (a build requirement)."""

    def build_extensions(self):
        spec = importlib.util.find_spec("jaxlib")  # found, not imported: jaxlib's own imports are not needed
        if spec is not None:
            for ext in self.extensions:
                ext.include_dirs.append(os.path.join(spec.submodule_search_locations[0], "include"))
        super().build_extensions()


def cpu_kernel_extensions() -> list[Extension]:
    """easympt's CPU kernels (easympt/kernels/cpu.py): one C++ source compiled into a shared library per
    instruction set, loaded with ctypes and registered as XLA FFI targets; the best one the CPU runs is
    picked at run time, so a wheel built on one x86-64 CPU runs right on another. Optional: without a
    compiler easympt installs and uses XLA's dot."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "easympt/kernels/csrc/isa_flags.json")) as f:
        flags = {isa: isa_flags for isa, isa_flags in json.load(f).items() if not isa.startswith("_")}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        flags = {"portable": flags["portable"]}  # the x86 sets compile on x86-64 only
    return [Extension(f"easympt.kernels._cpu_{isa}", [f"easympt/kernels/csrc/cpu_{isa}.cc"], language="c++",
                      depends=["easympt/kernels/csrc/cpu_kernels.inc", "easympt/kernels/csrc/isa_flags.json"],
                      extra_compile_args=["-O3", "-std=c++17", "-Wno-attributes", "-Wno-return-type", *isa_flags],
                      optional=True)
            for isa, isa_flags in flags.items()]


# transform/ and serve/ live at the top of the repository but install as
# easympt.transform and easympt.serve: nothing imports a bare `transform`.
setup(
    packages=["easympt", "easympt.generation", "easympt.kernels", "easympt.training", "easympt.transform",
              "easympt.serve"],
    package_dir={"easympt": "easympt", "easympt.transform": "transform", "easympt.serve": "serve"},
    package_data={"easympt": ["demo_model/*"]},  # the bundled demo model (HF format)
    ext_modules=cpu_kernel_extensions(),
    cmdclass={"build_ext": BuildWithXlaHeaders},
)
