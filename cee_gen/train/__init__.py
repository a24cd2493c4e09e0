"""Training for early exit (ConsistentEE and baselines). So far: the objectives (objectives.py)."""
