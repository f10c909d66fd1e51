# Sourced by the other scripts: the redis-cli call and the key layout (buffer_service/store.py).
# REDIS_URL, REDIS_KEY_PREFIX and BUFFER_SHARDS as the service reads them.
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
PREFIX="${REDIS_KEY_PREFIX:-bs}"
SHARDS="${BUFFER_SHARDS:-16}"

command -v redis-cli >/dev/null || { echo "redis-cli is not installed" >&2; exit 2; }

# One command; stdin closed so that it never eats the input of a surrounding `while read`.
# -c follows a Redis Cluster's redirections to the node that holds the key (no effect on one
# server); of a REDIS_URL listing several cluster nodes the first is asked. No script SCANs:
# each walks the shards' index keys, which works the same on a cluster.
rc() { redis-cli -c -u "${REDIS_URL%%,*}" --no-auth-warning "$@" </dev/null; }

shard_key() { printf '%s:{s%s}:%s' "$PREFIX" "$1" "$2"; }

redis_now_ms() {
  local t
  t=($(rc TIME))
  echo $(( t[0] * 1000 + t[1] / 1000 ))
}

# epoch ms -> "2026-11-25 10:00:00.123 UTC"
utc() {
  [[ -z "$1" ]] && { echo "-"; return; }
  printf '%s.%03d UTC' "$(date -u -d "@$(( $1 / 1000 ))" '+%F %T')" $(( $1 % 1000 ))
}

# A buffer in either format (buffer_service/lua/lib.lua, "buffer formats"): a compact buffer
# starts with a head "<first message ms>[...]", the only entry that starts with a digit; a json
# buffer's first message time is in the shard's `first` hash.
# buffer_head SHARD CONV -> the head's first message ms, or nothing for a json buffer
buffer_head() {
  local head
  head=$(rc LINDEX "$(shard_key "$1" "buf:$2")" 0)
  if [[ "$head" =~ ^([0-9]+) ]]; then echo "${BASH_REMATCH[1]}"; fi
}

# buffered_count SHARD CONV -> the number of messages (the head is none)
buffered_count() {
  local n
  n=$(rc LLEN "$(shard_key "$1" "buf:$2")")
  if [[ -n "$(buffer_head "$1" "$2")" ]]; then n=$(( n - 1 )); fi
  echo "$n"
}

# first_ms SHARD CONV -> the first message's epoch ms
first_ms() {
  local first
  first=$(buffer_head "$1" "$2")
  if [[ -z "$first" ]]; then first=$(rc HGET "$(shard_key "$1" first)" "$2"); fi
  echo "$first"
}
