"""The fine-tuning methods: one module each, the protocols they implement and the plumbing they share
in ``_shared``. Their configuration keys, and ``METHODS``, the one table from a method's name to its
module and Config, are in ``tuneforge.core.config.methods`` (torch-free); ``registry`` imports a
method by name.

This package's own module imports nothing, so ``tuneforge.core.config.methods`` is read (to check a
config file) without loading torch or any method.
"""
