"""edgerec's edge runtime: a torch-free daemon that serves sequential recommendations from a model bundle."""

__version__ = "0.1.0"
