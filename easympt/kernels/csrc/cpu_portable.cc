// easympt's CPU kernels for the portable instruction set (compiled with its flags in setup.py).
#include "cpu_kernels.inc"
