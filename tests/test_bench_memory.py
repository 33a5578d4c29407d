"""experiments/bench_memory.py measures the trainer's own train step (not a twin of it): lowered from
abstract arguments, its inputs are `trainer.init_state`'s state and its outputs the trainer's metrics."""

import os

import jax
import numpy as np

from zoo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bench = cli.load_module(os.path.join(REPO, "experiments", "bench_memory.py"))


def test_the_measured_step_is_the_trainers():
  cfg = bench.model_config("attention", {}, 16, "float32")  # the tiny preset: 2 layers × 64
  lowered, n_params = bench.lowered_step(cfg, 2)
  (state, active_p, batch_p), _ = lowered.args_info
  # The trainer's state: float32 parameters, best parameters and AdamW's two moments (4 copies: what the old
  # twin of the step lacked was the best parameters), plus the optimizer's counts and injected hyperparameters.
  assert set(state) == {"params", "opt_state", "best_params", "step"}
  floats = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state) if a.dtype == np.float32)
  assert 4 * n_params <= floats <= 4 * n_params + 8, (floats, n_params)
  assert active_p.shape == (1,) and batch_p["tokens"].shape == (1, 2, 16)
  _, metrics = lowered.out_info
  assert {"loss", "grad_norm", "learning_rate"} <= set(metrics)
