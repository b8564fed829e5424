"""Optional ahead-of-time build of the CUDA extension; everything else is in pyproject.toml.

``FASTPREF_BUILD_CUDA=1 pip install .`` compiles ``csrc/`` into ``fastpref._C`` with ninja
(``MAX_JOBS`` is respected) when a CUDA build of torch is present.  Without it the CUDA
backend builds itself on first eager use (``fastpref.backends.cuda_build``).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTPREF_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        raise RuntimeError("FASTPREF_BUILD_CUDA=1 but csrc/ holds no .cpp/.cu sources")
    ext_modules.append(
        CUDAExtension(
            "fastpref._C",
            sources,
            # no --use_fast_math: it makes tanhf (softcap) an approximation with ~2^-11 relative error
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-ftz=true", "-prec-div=false", "-fmad=true"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
