#!/usr/bin/env bash
# Show failed jobs, newest first: id, failed at, conversation, messages, attempts, error.
set -euo pipefail
. "$(dirname "$0")/redis-common.sh"

printf '%-10s %-27s %-18s %4s %5s  %s\n' JOB "FAILED AT" CONVERSATION MSGS TRIES ERROR
for ((s = 0; s < SHARDS; s++)); do
  rc ZREVRANGE "$(shard_key "$s" failed)" 0 -1 WITHSCORES | while read -r id && read -r at; do
    mapfile -t f < <(rc HMGET "$(shard_key "$s" "batch:$id")" conv count attempts error)
    printf '%-10s %-27s %-18s %4s %5s  %s\n' "$id" "$(utc "${at%.*}")" "${f[0]}" "${f[1]}" \
      "${f[2]}" "${f[3]}"
  done
done
echo "retry: buffer-service retry JOB (or --all-failed); messages: redis-cli LRANGE $PREFIX:{sN}:msgs:JOB 0 -1"
