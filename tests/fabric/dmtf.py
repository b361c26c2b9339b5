"""Run one of DMTF's Redfish validators (from PyPI) as its own process, exactly as its console
script does (`main()` with the same arguments), with one step that is not validation left out
each — the assertions they check are all still checked:

- `protocol`: redfish-protocol-validator's SSDP discovery. It sends M-SEARCH to the multicast
  groups on every interface and waits 5 s for answers, four times (IPv4 and IPv6, two search
  targets): 20 of the run's 24 s, and traffic that leaves loopback. The emulator speaks no SSDP
  (it is reached by URL), so the answer is known: no service. Here discovery returns exactly that
  without sending; the SERV_SSDP_ assertions stay NOT_TESTED, as they were.
- `service`: redfish-service-validator's Excel report. openpyxl styles every cell one by one,
  about 80 % of the run's CPU (about 8 s on a 2-core machine), and nobody reads the spreadsheet.
  The validation, the summary on stdout, the debug log and the HTML report are as before.

    python tests/fabric/dmtf.py protocol|service ARGS...   (ARGS: the validator's own)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _no_ssdp_answer(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
    """What `utils.discover_ssdp` returns when no service answers: {uuid: headers}, empty."""
    return {}


def _no_spreadsheet(*_args: Any, **_kwargs: Any) -> str:
    """Stands in for `report.xlsx_report`, which returns the path it wrote."""
    return "(not written: tests/fabric/dmtf.py)"


def protocol(argv: list[str]) -> int:
    from redfish_protocol_validator import console_scripts, utils

    utils.discover_ssdp = _no_ssdp_answer
    sys.argv = ["rf_protocol_validator", *argv]
    return console_scripts.main() or 0


def service(argv: list[str]) -> int:
    from redfish_service_validator import console_scripts, report

    report.xlsx_report = _no_spreadsheet
    sys.argv = ["rf_service_validator", *argv]
    return console_scripts.main() or 0


def command(which: str, *args: str) -> list[str]:
    """The argv that runs validator `which` ("protocol" or "service") with `args`."""
    return [sys.executable, str(Path(__file__).resolve()), which, *args]


if __name__ == "__main__":
    runners = {"protocol": protocol, "service": service}
    sys.exit(runners[sys.argv[1]](sys.argv[2:]))
