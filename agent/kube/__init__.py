"""The Kubernetes edge: raw-JSON client, watches/informers, leases. Nothing above this package sees
aiohttp or kubernetes-asyncio types; errors arrive as `agent.errors.Kube*`."""
