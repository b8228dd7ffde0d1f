import importlib.util
import os

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


# transform/ and serve/ live at the top of the repository but install as
# easympt.transform and easympt.serve: nothing imports a bare `transform`.
setup(
    packages=["easympt", "easympt.generation", "easympt.training", "easympt.transform", "easympt.serve"],
    package_dir={"easympt": "easympt", "easympt.transform": "transform", "easympt.serve": "serve"},
    package_data={"easympt": ["demo_model/*"]},  # the bundled demo model (HF format)
    # easympt's CPU decode kernel (easympt/cpu_kernels.py): a shared library loaded with ctypes and
    # registered as an XLA FFI target. Optional: without a compiler easympt installs and uses XLA's dot.
    ext_modules=[Extension("easympt._cpu_kernels", ["easympt/csrc/cpu_kernels.cc"], language="c++",
                           extra_compile_args=["-O3", "-std=c++17", "-Wno-attributes", "-Wno-return-type"],
                           optional=True)],
    cmdclass={"build_ext": BuildWithXlaHeaders},
)
