"""Simulated GPU servers, part of the product: what `cohdi-agent demo` and the fabric emulator's
appear hook give a node role that runs without real hardware.

- `agent.simulated.sysfs`: synthetic sysfs trees (`bus/pci/devices/<bdf>/` with the attribute files
  and `driver` / `iommu_group` symlinks a real PCI function has).
- `agent.simulated.stubnvml`: a stub libnvidia-ml.so.1 (C source shipped in the package, compiled
  on first use into the cache directory) that reads its GPU list from a file.

Tests and benchmarks use them too; test-only stand-ins live in `agent.testing`.
"""
