#!/usr/bin/env bash
# Install what building, testing and demonstrating xlb needs on a fresh Debian/Ubuntu
# machine (run as root). Idempotent: does nothing when everything is present.
set -euo pipefail
pkgs=(clang llvm libbpf-dev libxdp-dev libelf-dev zlib1g-dev pkg-config make m4 libclang-dev
      iproute2 ethtool nftables curl python3 iputils-ping iperf3 procps valgrind hping3
      fonts-dejavu-core wrk nginx-light systemd prometheus python3-prometheus-client tshark)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start services (nginx would listen on the host's port 80): the
  # tests start their own, inside namespaces.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install a Rust toolchain (rustup, rust-version in Cargo.toml or newer)" >&2
  exit 1
fi
