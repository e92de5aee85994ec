"""Training: the loop, optimisation, distributed setup, run directories and launchers (Ray, DeepSpeed)."""
