// easympt's CPU kernels for the avx512 instruction set (compiled with its flags in setup.py).
#include "cpu_kernels.inc"
