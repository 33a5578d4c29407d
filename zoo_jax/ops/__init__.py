"""zoo_jax ops: pure functions of arrays that the mixers and layers call (fla's `ops/`; the mixers are its
`layers/`). They import jax (and numpy) only: never flax, `zoo_jax.layers` or `zoo_jax.mixers`.

Convolution kernels. Each lives in `ops/<op>/` with one contract: a plain-`jnp` reference (float32),
fast paths (XLA, and a Pallas kernel with a `jax.custom_vjp` where autodiff cannot go through it), and a
dispatcher `op(..., implementation=None | 'reference' | 'xla' | ...)` that picks the fastest path measured
on the current backend (`FASTEST`) and rejects unknown names with a one-line ValueError.

  long_conv/      causal long convolution h ∗ u (+ D u): reference, xla (rfft), monarch (DFT matmuls), pallas
  gated_conv/     gated core out_gate ⊙ (h ∗ (in_gate ⊙ u) + D in_gate ⊙ u): the same four paths; the Pallas
                  kernel fuses gates, padded FFT, product, inverse FFT and D in one pass
  short_conv/     width-k depthwise causal conv + optional SiLU: reference, xla, pallas
  _fftconv.py     the Monarch FFT (shared by the XLA and Pallas paths) and the fused kernel with its VJP
  _dispatch.py    implementation validation, per-backend defaults, interpret mode on CPU, Pallas backend params

Recurrences and feature maps (plain jnp, float32):

  chunked_gla.py  gated linear recurrence (exponents <= 0), chunked and one token: mamba2 (SSD), gla
  delta_rule.py   the generalised delta rule (diagonal + rank-one transition), chunked WY/UT form, token
                  step, recurrent reference: delta_net, gated_delta_net, rwkv7
  feature_maps.py Based's Taylor-2 feature map and its kernel
"""
