"""zoo_jax: the sequence mixers of Zoology (Arora et al., ICLR 2024) on associative recall, in JAX/Flax.

Modules: `ops` (pure functions of arrays: kernels, recurrences), `data` (MQAR), `mixers` (the registry),
`model`, `config`, `sharding`, `train`, `configs` (the experiment configs). See WORKSPACE.md.
"""

__version__ = "0.1.0"
