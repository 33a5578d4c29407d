"""Shared fixtures."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def mqar_configs():
  """The experiment config module `experiments/configs/mqar.py` (its RUNS and get_config), loaded by path."""
  spec = importlib.util.spec_from_file_location(
      "mqar_config", os.path.join(REPO, "experiments", "configs", "mqar.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
