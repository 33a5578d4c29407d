"""python experiments/sweep.py --config=experiments/configs/tradeoff.py:cpu --workdir=/tmp/zoo_jax_tradeoff

The config is `zoo_jax.configs.tradeoff`; this file is the path `--config` loads."""
from zoo_jax.configs.tradeoff import *  # noqa: F401,F403
from zoo_jax.configs.tradeoff import get_config  # noqa: F401
