"""Ray Tune sweeps over carat's training run: ``python -m carat.tune`` (see :mod:`carat.tune.__main__`)."""
