"""The file layer: what rrome reads and writes, without torch and without the engine.

Errors, edit requests and their dataset shapes, deltas bundles and the shard writer's Python face,
hyperparameters, the corpus, cache paths, constants shared by every layer, and the file helpers
(atomic writes, hashing). Nothing under ``rrome.files`` imports torch or :mod:`rrome.engine`.
"""
