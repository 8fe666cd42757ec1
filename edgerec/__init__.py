"""edgerec's commands (``edgerec train | serve | recommend | track | demo | keygen | publish | registry | rollback``):
the only package that imports both the trainer and the torch-free node (``edge_runtime``)."""
from edge_runtime import __version__

__all__ = ["__version__"]
