#!/usr/bin/env bash
# Show one conversation's buffered messages with its deadline: conversation.sh ACCOUNT:CONVERSATION
set -euo pipefail
. "$(dirname "$0")/redis-common.sh"
conv="${1:?usage: $0 ACCOUNT:CONVERSATION (e.g. 1:42)}"
[[ "$conv" =~ ^[0-9]+:[0-9]+$ ]] || { echo "usage: $0 ACCOUNT:CONVERSATION (e.g. 1:42)" >&2; exit 2; }

# The shard is crc32(conv) % BUFFER_SHARDS; looking in each is simpler than computing it in bash.
for ((s = 0; s < SHARDS; s++)); do
  n=$(buffered_count "$s" "$conv")
  batch=$(rc HGET "$(shard_key "$s" active)" "$conv")
  [[ "$n" -eq 0 && -z "$batch" ]] && continue
  deadline=$(rc ZSCORE "$(shard_key "$s" due)" "$conv")
  first=$(first_ms "$s" "$conv")
  echo "conversation    $conv (shard $s)"
  echo "first message   $(utc "$first")"
  echo "deadline        $(utc "${deadline%.*}")"
  echo "batch in flight ${batch:--}"
  echo "buffered        $n message(s):"
  # Each message as stored: a JSON array [id, text, ...] (compact) or a JSON object (json).
  from=0
  if [[ -n "$(buffer_head "$s" "$conv")" ]]; then from=1; fi
  rc LRANGE "$(shard_key "$s" "buf:$conv")" "$from" -1 | nl -w3 -s'  '
  exit 0
done
echo "conversation $conv has no buffered messages and no batch in flight"
