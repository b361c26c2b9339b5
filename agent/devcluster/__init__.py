"""A local Kubernetes control plane (etcd + kube-apiserver + kube-scheduler) for tests, the demo
and the benchmarks: built from the Go module proxy into a cache outside the repository, started on
127.0.0.1 with its own CA, real RBAC, and torn down by pid. Never used by the agent in production.
"""
