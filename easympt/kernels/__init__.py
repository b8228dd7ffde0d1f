"""easympt's kernels, in one room.

- mask.py: AttentionMask, what every attention kernel reads to mask and bias (per token, O(T + S)).
- attention.py: the dispatcher (`attend`): which attention kernel runs, by shape and request.
- dense_attention.py, blockwise.py (flash attention, with its backward), pallas_attention.py
  (a Pallas kernel that takes ALiBi as slopes, for accelerators).
- cpu.py + csrc/: easympt's CPU kernels for inference (packed weight products, decode attention),
  one C++ source built per instruction set (AVX-512, AVX2, portable) and chosen at run time.
- linear.py: the weight-layout seam: the dense layer and embedding each layout runs, and the
  conversions of a parameter tree between layouts.
"""
