"""The built-in fabric-manager emulator (the embedded default): one state model of fabrics,
machines and pooled GPUs, served over both wire protocols the agent speaks (DMTF Redfish
composition and the Fsas/FTI fabric-manager API), with attach latency, fault injection, atomic
persistence, and a hook that makes an attached device appear on a simulated node."""
