"""Node role: hot-plug, inventory, kubelet plugin, CDI, checkpoint, safe removal."""
