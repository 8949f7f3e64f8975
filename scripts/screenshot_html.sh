#!/usr/bin/env bash
# Render an HTML page (e.g. an explanation index.html) to PNG with headless Chromium.
#   scripts/screenshot_html.sh runs/predict/explain/index.html[#sort=confidence-desc] [out.png] [WIDTHxHEIGHT]
# Needs Debian's chromium (apt-get install -y chromium). Nothing is fetched: networking is switched off.
set -euo pipefail
arg="${1:?usage: $0 PAGE.html[#fragment] [OUT.png] [WIDTHxHEIGHT]}"
page="${arg%%#*}"                                   # the file; a #fragment (e.g. #sort=...) is kept for the URL
fragment=""; [ "$arg" != "$page" ] && fragment="#${arg#*#}"
out="${2:-${page%.html}.png}"
size="${3:-1280x900}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "error: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 1
fi
[ -f "$page" ] || { echo "error: $page: no such file" >&2; exit 1; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$page")$fragment" 2>"$profile/chromium.log" || {
    echo "error: chromium failed on $page; its log:" >&2; cat "$profile/chromium.log" >&2; exit 1; }
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "wrote $out"
