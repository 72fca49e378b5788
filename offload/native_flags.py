"""Compiler and linker flags of the native extension, shared by setup.py and the JIT build.

Kept free of imports so setup.py can read it before anything is installed.
"""

# -ffp-contract=off: the CPU Adam kernel places its fused multiply-adds where torch has them and
# must not get others (see csrc/cpu_adam.cpp). -fno-math-errno lets sqrt vectorise.
# -fvisibility=hidden, as pybind11 recommends: only the module init symbol is exported.
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden")
LINK_FLAGS = ("-fopenmp",)
