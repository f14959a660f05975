#!/bin/sh
# pip during the image build (deploy/Containerfile): the optional build secrets, and empty build
# arguments treated as unset. Secrets are mounted for one RUN only; nothing here stays in a layer.
set -e
if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi
if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi
[ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL
[ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL
[ -n "$PIP_FIND_LINKS" ] || unset PIP_FIND_LINKS
exec /opt/venv/bin/python -m pip "$@"
