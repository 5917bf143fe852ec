#!/usr/bin/env bash
# Install the Debian packages lazycat needs, only those missing. Idempotent and quiet when
# everything is there already, so `make` can call it every time.
#
#   deploy/system-packages.sh runtime   what the box needs to run
#   deploy/system-packages.sh test      plus what the test suite needs (Chromium for the browser tests)
set -euo pipefail

runtime=(iproute2 nftables)
# chromium: the browser tests; coturn, stun-server: third-party STUN peers for interop tests;
# miniupnpd-nftables: a real UPnP IGD / NAT-PMP / PCP router for the port-mapping tests;
# iperf3, wireguard-go, wireguard-tools: the lab's throughput benchmark, beside userspace WireGuard
# (with recommends, wireguard-tools would pull in a kernel image: hence --no-install-recommends)
# openssh-server, curl: the lab's developer VM runs sshd (started by the test, in a namespace);
# curl reaches services by name, directly and through the client's proxy mode
test=(chromium coturn stun-server miniupnpd-nftables iperf3 wireguard-go wireguard-tools openssh-server curl)

case "${1:-runtime}" in
  runtime) wanted=("${runtime[@]}") ;;
  test) wanted=("${runtime[@]}" "${test[@]}") ;;
  *) echo "usage: $0 runtime|test" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "lazycat: this is not a Debian-like system; install these yourself: ${wanted[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "lazycat: these Debian packages are missing: ${missing[*]}" >&2
  echo "run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "lazycat: installing Debian packages: ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
