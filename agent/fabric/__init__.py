"""FabricManager protocol and backends (emulator, redfish, fti)."""
