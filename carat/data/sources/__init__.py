"""Where raw data comes from. Every source first lists cheap :class:`~carat.data.sources.segment.SegmentRef`
records, then loads one :class:`~carat.data.sources.segment.Segment` at a time (:mod:`carat.data.sources.segment`
also names the emotions, modalities, feature dimensions and splits that every stage shares).

The sources: the synthetic generator (:mod:`carat.data.sources.synth`, its ``[synth]`` section in
:mod:`carat.data.sources.synth_config`, its export as SDK files in :mod:`carat.data.sources.synth_csd`),
CMU-MultimodalSDK ``.csd`` files (:mod:`carat.data.sources.csd`) and MulT-style pickles
(:mod:`carat.data.sources.pickles`); ``mosei_std_folds.json`` (package data) holds the standard CMU-MOSEI folds.
Writing their segments into shards is :mod:`carat.data.corpus`'s work.
"""
