"""Networks and their on-disk form: classifier zoo, bundles and the model store.

This package is the bottom layer: it imports nothing from ``nnoculation``, ``service`` or
``worker``.
"""
