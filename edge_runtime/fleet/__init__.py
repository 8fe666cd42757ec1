"""The fleet: ``registry`` (the bundle-serving methods), ``sync`` (a node following the registry), ``transfer``
(resumable verified downloads), ``discovery`` (zeroconf), ``announce`` (what a process announces), ``routing``
(rendezvous hashing and ``FleetClient``).

``FleetClient`` and ``rendezvous_order`` are re-exported: ``from edge_runtime.fleet import FleetClient``.
"""
from .routing import FleetClient, rendezvous_order

__all__ = ["FleetClient", "rendezvous_order"]
