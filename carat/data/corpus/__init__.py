"""A corpus, and everything that writes or checks one: the shard writer and Parquet manifest
(:mod:`carat.data.corpus.shards`, the format; ``[storage]`` in :mod:`carat.data.corpus.storage_config`),
``prepare`` from ``.csd`` or pickle sources (:mod:`carat.data.corpus.prepare`, ``[prepare]`` in
:mod:`carat.data.corpus.prepare_config`), locked output directories (:mod:`carat.data.corpus.outdir`), the dataset
card and its train-split feature statistics (:mod:`carat.data.corpus.card`, :mod:`carat.data.corpus.featstats`),
and the ``verify`` and ``inspect`` commands (:mod:`carat.data.corpus.verify`, :mod:`carat.data.corpus.inspect`).

A corpus in object storage is read with ranged GETs and published after a local write by
:mod:`carat.data.corpus.remote`. :mod:`carat.data.corpus.provision` gives the training commands (``carat.train``,
``carat.tune``) their corpus: synthesized if missing (only where that cannot replace data), checked once before
any worker starts.
"""
