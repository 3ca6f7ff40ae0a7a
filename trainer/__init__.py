"""Two-stage pretraining of the reference model; offline proxy RL."""
