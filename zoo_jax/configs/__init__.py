"""Experiment configs as code: each module's `get_config(arg)` returns an `ml_collections.ConfigDict`
(big_vision's style), importable (`from zoo_jax.configs import mqar`) by tests, notebooks and other configs.

`experiments/configs/<name>.py` re-exports each one as a file, the path `--config` takes
(`python experiments/mqar.py --config=experiments/configs/mqar.py:attention`).

  mqar            attention vs BaseConv on CPU; RUNS: a run for every registered mixer
  figure2         the paper's Figure 2 as a sweep (scale cpu | paper)
  tradeoff        Zoology's README trade-off of the gated and delta-rule recurrences, as a sweep
  lm              LM presets: the tiny CPU pair, ~125M and ~360M
  sparse_hybrids  Section 5: BaseConv + sparse attention variants on MQAR and the LM
"""
