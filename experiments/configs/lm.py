"""python experiments/lm.py --config=experiments/configs/lm.py:base_conv --workdir=/tmp/zoo_jax_lm/base_conv

The config is `zoo_jax.configs.lm`; this file is the path `--config` loads."""
from zoo_jax.configs.lm import *  # noqa: F401,F403
from zoo_jax.configs.lm import get_config  # noqa: F401
