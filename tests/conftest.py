"""Shared fixtures."""

import pytest

from zoo_jax.configs import mqar


@pytest.fixture
def mqar_configs():
  """The MQAR experiment config module `zoo_jax.configs.mqar` (its RUNS and get_config)."""
  return mqar
