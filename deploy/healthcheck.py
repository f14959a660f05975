"""The image's health check: the server answers HTTP on its port (any answer below 500 counts, so a
401 from a server with Keycloak auth on is healthy too). Exit 0 healthy, 1 not."""

import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen("http://127.0.0.1:8000/info/", timeout=8)
except urllib.error.HTTPError as exc:
    sys.exit(1 if exc.code >= 500 else 0)
except OSError as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
