"""Running a node as a service: ``daemon`` (one lifecycle: start-up, main loop, reload, shutdown), ``node`` (the node
and registry processes, assembled from the other rooms), ``metrics`` (Prometheus), ``logs``, ``systemd``."""
