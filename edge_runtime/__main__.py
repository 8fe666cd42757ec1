"""``python -m edge_runtime``: the node is a library; its commands are ``edgerec`` / ``python -m edgerec``."""
import sys

print("edge_runtime is the node's library; run its commands with `edgerec ...` or `python -m edgerec ...` "
      "(e.g. python -m edgerec serve --bundle DIR)", file=sys.stderr)
sys.exit(2)
