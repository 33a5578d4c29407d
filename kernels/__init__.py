"""zoo_jax kernels. Each op lives in `kernels/<op>/` with one contract: a plain-`jnp` reference (float32),
fast paths (XLA, and a Pallas kernel with a `jax.custom_vjp` where autodiff cannot go through it), and a
dispatcher `op(..., implementation=None | 'reference' | 'xla' | ...)` that picks the fastest path measured
on the current backend (`FASTEST`) and rejects unknown names with a one-line ValueError.

  long_conv/    causal long convolution h ∗ u (+ D u): reference, xla (rfft), monarch (DFT matmuls), pallas
  gated_conv/   gated core out_gate ⊙ (h ∗ (in_gate ⊙ u) + D in_gate ⊙ u): the same four paths; the Pallas
                kernel fuses gates, padded FFT, product, inverse FFT and D in one pass
  short_conv/   width-k depthwise causal conv + optional SiLU: reference, xla, pallas
  _fftconv.py   the Monarch FFT (shared by the XLA and Pallas paths) and the fused kernel with its VJP
  _dispatch.py  implementation validation, per-backend defaults, interpret mode on CPU, Pallas backend params
"""
