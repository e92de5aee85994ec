"""The training loader: a corpus read back as token-budget batches, the same number of steps on every rank.

Its stages, in order (named in one place, as open_clip's ``data.py`` lists its WebDataset pipeline), each in
the module of this package named beside it::

    1 index      split_index.load_split_index  one split's manifest rows as arrays (keys, lengths, byte
                                               ranges, hashes), shard files checked; no tar is opened
    2 plan       plan.plan_epoch               length-sorted token-budget batches for (seed, epoch), dealt so
                                               every rank runs the same steps; DataLoader worker w of n takes
                                               slots w, w+n, ... (pipeline.PlannedBatches)
    3 read       tar_reader.ShardReader        one ranged read per shard a batch touches (ranged GETs through
                                               carat.data.corpus.remote for object storage), each sample's
                                               bytes checked against its manifest hash, split into members
    4 decode     collate.decode_sample         .npy and .json members only; nothing is unpickled
    5 collate    collate.collate               padded in the stored dtype into a batch.CollatedBatch;
                                               non-finite samples skipped or raised (collate.nonfinite_rows)
    6 transfer   shm_pool.SharedBufferPool     worker to main process through a reused shared-memory ring
    7 to_batch   collate.to_batch              copied out, cast to float32, pinned: the batch.Batch the
                                               training loop consumes

:mod:`carat.data.loader.pipeline` wires the stages into torch's DataLoader (``build_loader``, the entry point);
:mod:`carat.data.loader.loader_config` is the ``[loader]`` section, kept apart so that composing the
configuration imports no torch DataLoader or WebDataset.
"""
