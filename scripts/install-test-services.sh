#!/usr/bin/env bash
# Debian packages the test suite runs for real: Prometheus and promtool (package prometheus), and
# ffprobe (package ffmpeg), the independent tool clips are measured with.
# Installed once; a machine that has them already is left alone.
set -euo pipefail
command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v ffprobe >/dev/null && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus ffmpeg >/dev/null
# Where the package starts a system-wide Prometheus (on all interfaces), stop it: the tests and
# `farm monitor up` start their own, on loopback.
if [ -x /etc/init.d/prometheus ]; then
  $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
echo "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') and $(ffprobe -version | head -1 | cut -d' ' -f1-3) installed"
