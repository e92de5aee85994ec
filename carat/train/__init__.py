"""Training: the loop, optimisation, distributed setup, run directories and launchers (Ray, DeepSpeed).

Importing this package sets carat's OpenMP wait-policy default (:mod:`carat.threads`) before its modules load
torch: ``python -m carat.train`` and the ``deepspeed`` launcher's ranks import it first; Ray's workers, which
load torch earlier, get the variable through their runtime environment (:func:`carat.train.launch.build_trainer`).
"""

from carat.threads import set_default_wait_policy

set_default_wait_policy()
