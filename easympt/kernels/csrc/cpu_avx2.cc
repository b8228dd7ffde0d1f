// easympt's CPU kernels for the avx2 instruction set (compiled with its flags in setup.py).
#include "cpu_kernels.inc"
