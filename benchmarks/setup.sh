#!/bin/sh
# What the benchmarks compare skyferry with (restic, rclone, zstd) and measure them by (GNU
# time), from the system package manager (Debian/Ubuntu). Run as root: sh benchmarks/setup.sh
set -eu
missing=""
for tool in restic rclone zstd; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -x /usr/bin/time ] || missing="$missing time"
if [ -n "$missing" ]; then
  apt-get update -q
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
echo "benchmark peers: $(restic version | cut -d' ' -f1-2); $(rclone version | head -1);" \
  "$(zstd --version)"
