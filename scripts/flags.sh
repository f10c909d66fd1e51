#!/usr/bin/env bash
# Show the feature flags: each flag's value (or its default when never set).
set -euo pipefail
. "$(dirname "$0")/redis-common.sh"

# Defaults as in buffer_service/flags.py.
declare -A defaults=([message_buffering]=on [response_quality_enhancement]=on [processing]=on
                     [buffering_inboxes]="" [buffering_percent]=100)
printf '%-30s %-12s %s\n' FLAG VALUE SOURCE
for name in message_buffering response_quality_enhancement processing buffering_inboxes \
            buffering_percent; do
  value=$(rc HGET "$PREFIX:flags" "$name")
  if [[ -n "$value" ]]; then source=set; else value=${defaults[$name]}; source=default; fi
  printf '%-30s %-12s %s\n' "$name" "${value:-(all)}" "$source"
done
