"""MessagePack-RPC, knowing nothing of recommendations: ``protocol`` (message kinds, error objects, reply matching),
``server`` (asyncio framing and dispatch), ``client`` (blocking and asyncio clients), ``methods`` (the method table
and the parameter checks every service uses)."""
