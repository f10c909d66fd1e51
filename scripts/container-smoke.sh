#!/usr/bin/env bash
# Container smoke test: build the image and run it the way docker-compose.yml declares the
# `buffer-service` and `worker` services, against a real redis-server and the Chatwoot and LLM
# stand-ins on this host. Needs root, podman, runc and debootstrap (docs/containers.md says why).
#
# 1. a Debian base (debootstrap minbase + python3 and python3-venv) is imported, because no
#    image registry is reachable from our machines; the Dockerfile gets it as PYTHON_IMAGE;
# 2. the image is built with --format docker (keeps HEALTHCHECK) and --network=host;
# 3. scripts/container_smoke.py starts the stand-ins, runs the containers with the command,
#    environment and health check of docker-compose.yml (plus .env.example), sends a burst of
#    webhooks, checks that one reply was posted, runs `podman healthcheck run`, sends SIGTERM
#    and checks exit 0; first serve alone, then the `workers` profile.
#
# Everything lives in one state folder (podman root, runroot, tmpdir, Redis data), removed at
# the end, also on failure; so is the state podman writes outside it (listed in OUTSIDE) when
# it was not there before.
# Usage: scripts/container-smoke.sh   (PYTHON defaults to .venv/bin/python: run `make install`)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SUITE=bookworm
BASE_IMAGE=localhost/buffer-smoke-base:$SUITE
IMAGE=localhost/buffer-service:smoke
started=$(date +%s)

log() { printf '[container-smoke %3ds] %s\n' "$(($(date +%s) - started))" "$*"; }

# Exit 75 (EX_TEMPFAIL) means "this machine cannot run the test": .ci/run reports it as skipped.
# Any other failure is the image's, the compose file's or this script's, and fails the run.
cannot_run_here() { echo "container-smoke: cannot run here: $*" >&2; exit 75; }
for tool in podman runc debootstrap redis-server; do
  command -v "$tool" >/dev/null || cannot_run_here "$tool is not installed"
done
[ "$(id -u)" = 0 ] || cannot_run_here "needs root (podman with cgroupfs)"
[ -x "$PYTHON" ] || { echo "container-smoke: $PYTHON not found: run make install first" >&2; exit 2; }

# State podman (and mount) write outside --root/--runroot, seen on this kind of machine; removed
# at the end only if this run created it, so nobody else's podman state is touched.
OUTSIDE=(/run/containers /run/runc /run/libpod /run/mount /var/lib/containers
         /etc/containers/networks /etc/cni/net.d/cni.lock "${HOME:-/root}/.config/containers")
created_outside=()
for path in "${OUTSIDE[@]}"; do [ -e "$path" ] || created_outside+=("$path"); done

STATE="$(mktemp -d /var/tmp/buffer-smoke.XXXXXX)"
mkdir -p "$STATE/tmp" "$STATE/redis" "$STATE/pip" "$STATE/empty"
export TMPDIR="$STATE/tmp" CONTAINERS_CONF="$STATE/containers.conf"
# Root here cannot raise RLIMIT_NOFILE/NPROC (crun and runc's defaults fail on setrlimit);
# crun does not support this host's hybrid cgroups; no systemd or journald to talk to.
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
EOF
# One podman command for this script, its helper and `timeout`, bound to the state folder.
pm="$STATE/podman"
printf '#!/bin/sh\nexec podman --root "%s/root" --runroot "%s/runroot" --tmpdir "%s/tmp" "$@"\n' \
  "$STATE" "$STATE" "$STATE" >"$pm"
chmod +x "$pm"

unmount_under() { findmnt -rn -o TARGET | grep "^$1/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true; }
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  "$pm" rm --all --force --time 0 >/dev/null 2>&1
  "$pm" system reset --force >/dev/null 2>&1
  # Whatever reset left mounted under the state folder (overlay layers, shm) is unmounted first.
  unmount_under "$STATE"
  rm -rf "$STATE"
  for path in "${created_outside[@]}"; do rm -rf "$path"; done
  case "$rc" in 0) log "passed" ;; 75) log "skipped" ;; *) log "FAILED (exit $rc)" ;; esac
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

"$pm" info >"$STATE/podman-info.log" 2>&1 || cannot_run_here "podman info fails: $(tail -1 "$STATE/podman-info.log")"

# 1. The base: the Debian mirror apt already uses, so it works wherever apt-get does.
mirror="$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 'Identifier: Packages' 2>/dev/null \
          | awk -v s="$SUITE" '$2 == s {print $1; exit}')"
mirror="${mirror:-http://deb.debian.org/debian/}"
log "debootstrap --variant=minbase $SUITE from $mirror"
timeout 600 debootstrap --variant=minbase "$SUITE" "$STATE/rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
  || { tail -5 "$STATE/debootstrap.log"; cannot_run_here "debootstrap could not make a $SUITE base from $mirror"; }
# debootstrap can leave /proc mounted in the tree; the tarball must hold the files alone.
unmount_under "$STATE/rootfs"
tar -C "$STATE/rootfs" --one-file-system -c . | "$pm" import --quiet - "$BASE_IMAGE-minbase" >/dev/null
rm -rf "$STATE/rootfs"
log "python3 on top of the base"
# The first container podman runs: if this fails, podman cannot run containers on this machine.
timeout 600 "$pm" build --quiet --network=host --format docker -t "$BASE_IMAGE" -f - "$STATE/empty" \
  >/dev/null <<EOF || cannot_run_here "podman could not run a build step on the $SUITE base"
FROM $BASE_IMAGE-minbase
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
EOF
"$pm" rmi "$BASE_IMAGE-minbase" >/dev/null

# 2. The image. pip in the build step must trust this machine's CA (outbound HTTPS is re-signed
# here): the host's bundle and a pip.conf are mounted for the build, never copied into a layer.
cp /etc/ssl/certs/ca-certificates.crt "$STATE/pip/ca.pem"
printf '[global]\ncert = /etc/xdg/pip/ca.pem\n' >"$STATE/pip/pip.conf"
log "podman build (PYTHON_IMAGE=$BASE_IMAGE)"
timeout 600 "$pm" build --quiet --network=host --format docker --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  -v "$STATE/pip:/etc/xdg/pip:ro" -t "$IMAGE" "$ROOT" >/dev/null
"$pm" image prune --force >/dev/null   # the build stage
"$pm" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | sed 's/^/  image /'
base_bytes=$("$pm" image inspect --format '{{.Size}}' "$BASE_IMAGE")
image_bytes=$("$pm" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((image_bytes / 1000000)) MB, of which the service's own layers $(((image_bytes - base_bytes) / 1000000)) MB"
log "user $("$pm" image inspect --format '{{.Config.User}}' "$IMAGE"), runs $("$pm" image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$IMAGE")"

# 3. The containers, as docker-compose.yml declares them, and a real redis-server started the
# way it declares `buffer-redis` (the repo's redis.conf), on a free port of this host.
log "run the services as docker-compose.yml declares them; burst, reply, health checks, SIGTERM"
timeout 300 "$PYTHON" "$ROOT/scripts/container_smoke.py" \
  --podman "$pm" \
  --image "$IMAGE" --compose "$ROOT/docker-compose.yml" --env-file "$ROOT/.env.example" \
  --redis-dir "$STATE/redis"
