"""Shared fixtures."""

import os

import pytest

from zoo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def mqar_configs():
  """The experiment config module `experiments/configs/mqar.py` (its RUNS and get_config), loaded by path."""
  return cli.load_module(os.path.join(REPO, "experiments", "configs", "mqar.py"))
