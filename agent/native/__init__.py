"""cffi: the C sysfs/PCIe scan (API mode) and NVML (ABI mode, dlopen)."""
