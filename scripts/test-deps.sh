#!/usr/bin/env bash
# The system programs the test suite drives for real, installed when missing (Debian / Ubuntu):
#   espeak-ng        speaks the test audio
#   wordnet-base     the glosses the demo's text data defines words with
#   chromium, chromium-driver   render and drive the web chat page
#   fonts-dejavu-core, fonts-liberation   the fonts the demo's charts are drawn in (training and held-out)
# Run by the README's test command (and so by .ci/run) before pytest.
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ] || missing+=(fonts-liberation)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "test set-up: missing ${missing[*]}; install them as root (apt-get install ${missing[*]}) and run again" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "test set-up: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
  exit 1
fi
echo "test set-up: installing ${missing[*]} (apt-get)"
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; } \
    >/tmp/ernie45-test-deps.log 2>&1; then
  echo "test set-up: apt-get could not install ${missing[*]} (log: /tmp/ernie45-test-deps.log)" >&2
  tail -5 /tmp/ernie45-test-deps.log >&2
  exit 1
fi
