"""Pure domain: devices, pools, claims, attachments, decisions. No I/O, no asyncio."""
