"""The main job on the embedded default: a local control plane, the built-in fabric emulator,
simulated GPU servers each running the real node role (its own synthetic sysfs tree and stub NVML,
fed by the emulator's appear hook), one cluster role, and a workload with a live view, a summary
and a timeline plot. Used by `cohdi-agent demo` and by the full-stack test."""
