"""The Kubernetes objects the agent installs: CRDs (CoHDI-compatible), the DeviceClass, RBAC.
Built in Python from one source; `cohdi-agent manifests` writes them to packaging/ and a test
checks that packaging/ is not stale."""
