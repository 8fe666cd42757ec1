"""``from edge_runtime.client import Client``: the MessagePack-RPC clients (``rpc/client.py``), under the name the
README has always given them."""
from .rpc.client import AsyncClient, Client, Credentials, RpcError

__all__ = ["AsyncClient", "Client", "Credentials", "RpcError"]
