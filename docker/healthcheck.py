#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when an HTTP GET of the service's health URL answers 2xx.

The slim runtime image has neither curl nor wget (no extra packages, smaller attack
surface), so the check uses the interpreter the services already run on. The URL comes
from ``HEALTHCHECK_URL`` when set (an operator who moves ``METRICS_PORT`` sets it too),
else from the first argument the Dockerfile's HEALTHCHECK passes.
"""

import os
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("HEALTHCHECK_URL") or (sys.argv[1] if len(sys.argv) > 1 else "")
    if not url:
        print("healthcheck: no URL (set HEALTHCHECK_URL or pass one)", file=sys.stderr)
        return 1
    try:
        # 3 s stays below the HEALTHCHECK --timeout, so a hung server reads as unhealthy here
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if 200 <= response.status < 300 else 1
    except OSError as exc:  # URLError and HTTPError (non-2xx) are OSErrors
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
