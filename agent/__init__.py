"""cohdi-agent: dynamic GPU provisioning for Kubernetes on composable disaggregated infrastructure.

Nothing happens at import: no clients, no dlopen, no logging configuration, no event loop policy.
`agent.app` builds the runtime; `agent.__main__` installs uvloop and runs it.
"""

__version__ = "0.1.0"

#: The Kubernetes release whose APIs (resource.k8s.io/v1 with binding conditions and per-device node
#: selection) this version targets, and whose control plane the test suite builds.
KUBERNETES_VERSION = "v1.36.3"
#: The etcd release built for the local control plane (3.6.x is what Kubernetes 1.36 pins).
ETCD_VERSION = "v3.6.16"
