"""python experiments/sweep.py --config=experiments/configs/figure2.py:cpu --workdir=/tmp/zoo_jax_fig2

The config is `zoo_jax.configs.figure2`; this file is the path `--config` loads."""
from zoo_jax.configs.figure2 import *  # noqa: F401,F403
from zoo_jax.configs.figure2 import get_config  # noqa: F401
