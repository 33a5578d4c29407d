"""python experiments/sparse_hybrids.py --config=experiments/configs/sparse_hybrids.py:smoke --workdir=/tmp/s

The config is `zoo_jax.configs.sparse_hybrids`; this file is the path `--config` loads."""
from zoo_jax.configs.sparse_hybrids import *  # noqa: F401,F403
from zoo_jax.configs.sparse_hybrids import get_config  # noqa: F401
