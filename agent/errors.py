"""The one error tree of the agent.

Every dependency's exceptions (aiohttp, kubernetes-asyncio, grpc, cffi, OS errors) are mapped into
this tree at exactly one place at the edge that calls the dependency, with `raise ... from exc`.
Callers decide what to do from two questions only: is it *transient* (retry with backoff) or
*permanent* (surface it, do not spin), and whose fault was it (the `fault` attribute: config, kube,
fabric, nvml, sysfs, checkpoint, prepare, devcluster). Messages say what was wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class AgentError(Exception):
    """Root of everything the agent raises on purpose."""

    #: Retrying the same operation later may succeed.
    transient: ClassVar[bool] = False
    #: Who is to blame: the operator's configuration, the API server, the fabric manager, ...
    fault: ClassVar[str] = "agent"
    #: Seconds the server asked us to wait before retrying (HTTP Retry-After on 429/503), if it
    #: said; retry loops wait at least this long (`agent.backoff.RateLimiter`).
    retry_after: float | None = None


class TransientError(AgentError):
    """Retry with backoff: a timeout, a 5xx, a conflict, a connection refused."""

    transient = True


class PermanentError(AgentError):
    """Retrying the same thing will fail the same way: report it and stop trying."""

    transient = False


# --- configuration -------------------------------------------------------------------------------


class ConfigError(PermanentError):
    """A setting is invalid. The message names the setting, the value and what is allowed."""

    fault = "config"

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid setting {setting}={value!r}: {allowed}")


# --- Kubernetes API ------------------------------------------------------------------------------


class KubeError(AgentError):
    """Something the Kubernetes API server answered, or failed to answer."""

    fault = "kube"

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        reason: str = "",
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        #: The answer's HTTP headers (case-insensitive when they came from the server); empty for
        #: errors without an answer.
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        super().__init__(message)


class KubeUnavailable(KubeError, TransientError):
    """Connection refused or reset, a timeout, 429 or a 5xx: the API server is unwell; retry."""


class KubeConflict(KubeError, TransientError):
    """409 on update: someone wrote first. Re-read and re-apply the change."""


class KubeGone(KubeError, TransientError):
    """410: the resourceVersion we watched from was compacted away. Relist."""


class KubeNotFound(KubeError, PermanentError):
    """404: the object (or the API) does not exist."""


class KubeAlreadyExists(KubeError, PermanentError):
    """409 on create: the object exists already."""


class KubeUnauthorized(KubeError, TransientError):
    """401: the server did not accept our credentials. Usually a rotated or expired token (a
    projected service-account token is replaced by the kubelet before it expires): the token is
    re-read from its file on every request, so a retry sends the new one. If it persists, the
    kubeconfig's credentials are wrong."""


class KubeForbidden(KubeError, PermanentError):
    """403: RBAC does not allow this (we are who we say, but may not). Fix the ClusterRole."""


class KubeInvalid(KubeError, PermanentError):
    """400/422: the server rejected the object. The message carries the server's field errors."""


class KubeConfigError(KubeError, PermanentError):
    """No usable kubeconfig or in-cluster service account."""


# --- fabric managers -----------------------------------------------------------------------------


class FabricError(AgentError):
    """Something a fabric manager answered, or failed to answer."""

    fault = "fabric"


class FabricUnavailable(FabricError, TransientError):
    """The fabric manager is down, timed out, or answered 5xx."""


class FabricRejected(FabricError, PermanentError):
    """The fabric manager refused the operation: unknown device, attached elsewhere, bad request."""


class FabricTimeout(FabricUnavailable):
    """A call (or an attach/detach we followed) did not finish in time; the state is re-read."""


class FabricProtocolError(FabricError, TransientError):
    """The fabric manager answered something we cannot parse (not JSON, missing fields). Often a
    proxy's error page; retried a few times, then surfaced with the start of the body."""


class FabricAuthError(FabricError, PermanentError):
    """The fabric manager refused our credentials: check the user, password file and realm."""


class DeviceNotFound(FabricRejected):
    """The fabric manager does not know this device (or machine)."""


class DeviceBusy(FabricRejected):
    """The device is attached, or being attached, to another machine."""


class DeviceFailed(FabricRejected):
    """The fabric reports the device (or its attach/detach) failed; it needs an operator."""


# --- node ----------------------------------------------------------------------------------------


class NvmlError(AgentError):
    """An NVML call failed (return code mapped by agent.native)."""

    fault = "nvml"


class SysfsError(AgentError):
    """Reading or writing the PCI tree in sysfs failed."""

    fault = "sysfs"


class CheckpointError(PermanentError):
    """The node checkpoint is unreadable or corrupt."""

    fault = "checkpoint"


class PrepareError(AgentError):
    """NodePrepareResources or NodeUnprepareResources could not complete for one claim."""

    fault = "prepare"


# --- the local control plane (tests, demo, benchmarks) -------------------------------------------


class DevClusterError(PermanentError):
    """Building or starting the local etcd / kube-apiserver / kube-scheduler failed, or building
    the simulated servers' stub NVML library (no C compiler, a compile error)."""

    fault = "devcluster"


# --- installation --------------------------------------------------------------------------------


class MissingExtra(PermanentError):
    """A command needs an optional dependency that is not installed (`pip install cohdi-agent`
    installs only what `cohdi-agent run` needs). The message names the module, what needs it and
    the extra that installs it; `extra` is the name in pyproject.toml's optional-dependencies."""

    fault = "install"

    def __init__(self, module: str, *, extra: str, needed_for: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"the Python package {module!r} is not installed (needed by {needed_for}); "
            f"install it with: pip install 'cohdi-agent[{extra}]'"
        )
