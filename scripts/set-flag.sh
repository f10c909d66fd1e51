#!/usr/bin/env bash
# Set a feature flag for every process (seen within a second): set-flag.sh NAME VALUE
set -euo pipefail
. "$(dirname "$0")/redis-common.sh"
name="${1:-}" value="${2-}"
usage="usage: $0 NAME VALUE  (message_buffering|response_quality_enhancement|processing on|off,
       buffering_percent 0-100, buffering_inboxes 1,2,3 or \"\" for all)"
[[ $# -eq 2 ]] || { echo "$usage" >&2; exit 2; }

case "$name" in
  message_buffering|response_quality_enhancement|processing)
    [[ "$value" == on || "$value" == off ]] || { echo "$name: expected on or off" >&2; exit 2; } ;;
  buffering_percent)
    [[ "$value" =~ ^[0-9]+$ && "$value" -le 100 ]] || { echo "$name: expected 0-100" >&2; exit 2; } ;;
  buffering_inboxes)
    [[ -z "$value" || "$value" =~ ^[0-9]+(,[0-9]+)*$ ]] || {
      echo "$name: expected a comma list of inbox ids, or \"\" for all" >&2; exit 2; } ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
rc HSET "$PREFIX:flags" "$name" "$value" >/dev/null
# Workers paused by `processing off` look at the switch again at once.
rc PUBLISH "$PREFIX:wake" 0 >/dev/null
echo "$name = ${value:-(all)}"
