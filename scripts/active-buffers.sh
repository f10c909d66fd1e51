#!/usr/bin/env bash
# Show every pending burst: conversation, buffered messages, deadline (UTC) and ms until it is due.
set -euo pipefail
. "$(dirname "$0")/redis-common.sh"

now=$(redis_now_ms)
printf '%-22s %6s  %-27s %10s  %s\n' CONVERSATION MSGS "DEADLINE" "DUE IN MS" "NOTE"
for ((s = 0; s < SHARDS; s++)); do
  rc ZRANGE "$(shard_key "$s" due)" 0 -1 WITHSCORES | while read -r conv && read -r deadline; do
    deadline=${deadline%.*}
    printf '%-22s %6s  %-27s %10s\n' "$conv" "$(buffered_count "$s" "$conv")" \
      "$(utc "$deadline")" "$(( deadline - now ))"
  done
  # A conversation whose next burst waits for the batch in flight has no deadline until then.
  rc HGETALL "$(shard_key "$s" active)" | while read -r conv && read -r batch; do
    n=$(buffered_count "$s" "$conv")
    if [[ "$n" -gt 0 && -z "$(rc ZSCORE "$(shard_key "$s" due)" "$conv")" ]]; then
      printf '%-22s %6s  %-27s %10s  %s\n' "$conv" "$n" "-" "-" "waiting for batch $batch"
    fi
  done
done
