"""Training: the loop, optimisation, distributed setup, run directories and launchers (Ray, DeepSpeed).

Importing it has no side effects. The commands that train (``python -m carat.train``, the ``deepspeed``
launcher's ranks, ``python -m carat.tune``) set carat's OpenMP wait-policy default (:mod:`carat.threads`) as their
first statement, before any module loads torch; Ray's workers, which load torch earlier, get the variable through
their runtime environment (:func:`carat.train.launch.build_trainer`).
"""
