"""rl_pbt: Population Based Training of RLlib agents with Ray Tune, Hydra and MLflow."""

__version__ = "0.1.0"
