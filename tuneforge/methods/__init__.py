"""The fine-tuning methods: one module each, the protocols they implement in ``_shared``, their
configuration keys in ``configs`` (torch-free) and the table from name to method in ``registry``.

This package's own module imports nothing, so ``tuneforge.core.config.methods`` is read (to check a
config file) without loading torch or any method.
"""
