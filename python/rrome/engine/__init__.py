"""The editing engine: torch and transformers at work on a loaded model.

Adapters and loading, hooks, tokenisation (once per edit), keys, the value optimisation, the
rank-one update, the layer statistics C0 (their collection, also across workers, and their
cache), sequential retention, the disabling-edit screen, the forward-pass probabilities an edit
reports, and :class:`~rrome.engine.editor.Editor`, which ties them together. The engine reads
files through :mod:`rrome.files` and never imports :mod:`rrome.eval`.
"""
