#!/usr/bin/env bash
# Headless Chromium for the browser tests: Debian's chromium package, installed when missing (as root, from
# Debian's mirror; test tools' own browser downloads are not reachable here). Prints the browser's path.
#   hack/chromium.sh            install when missing, print the path
# KUBEFORGE_CHROMIUM: a browser to use instead (nothing installed).
set -euo pipefail
if [[ -n ${KUBEFORGE_CHROMIUM:-} ]]; then
  [[ -x $KUBEFORGE_CHROMIUM ]] || { echo "KUBEFORGE_CHROMIUM=$KUBEFORGE_CHROMIUM is not an executable" >&2; exit 1; }
  echo "$KUBEFORGE_CHROMIUM"; exit 0
fi
for b in /usr/bin/chromium /usr/bin/chromium-browser; do
  [[ -x $b ]] && { echo "$b"; exit 0; }
done
[[ $(id -u) == 0 ]] || { echo "Chromium is not installed; run: sudo apt-get install -y chromium" >&2; exit 1; }
echo "installing Debian's chromium ..." >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
echo /usr/bin/chromium
