"""Applications built on the layers below: compare (several methods on one task) and the web UI."""
