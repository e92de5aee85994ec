"""carat's data, in three stages: where segments come from, the corpus they are written into, and the loader
that reads the corpus back for training.

:mod:`carat.data.sources` yields labelled segments (the synthetic CMU-MOSEI-like generator, CMU-MultimodalSDK
``.csd`` files, MulT-style pickles) and defines the segment every stage shares; :mod:`carat.data.corpus` writes
them into length-sorted WebDataset shards with a Parquet manifest and a dataset card, checks, describes and
publishes a corpus, and provisions the one a training command needs; :mod:`carat.data.loader` turns a corpus
into token-budget batches that keep every rank in step. ``python -m carat.data`` (:mod:`carat.data.__main__`)
runs ``synth``, ``prepare``, ``inspect`` and ``verify``.
"""
