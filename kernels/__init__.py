"""zoo_jax kernels. Each op lives in `kernels/<op>/` with one contract: a plain-`jnp` reference, fast paths,
and a dispatcher `op(..., implementation=None | 'reference' | 'xla' | ...)` that picks the fastest known
path for the current backend."""
