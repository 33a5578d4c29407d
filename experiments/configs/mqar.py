"""python experiments/mqar.py --config=experiments/configs/mqar.py:attention --workdir=/tmp/attn

The config is `zoo_jax.configs.mqar`; this file is the path `--config` loads."""
from zoo_jax.configs.mqar import *  # noqa: F401,F403
from zoo_jax.configs.mqar import get_config  # noqa: F401
