#!/usr/bin/env bash
# Docker for the builder tests on a Debian machine: the engine, a local Python base image (there is no
# registry to pull one from) and a registry on loopback to push to. Each step is skipped when its result
# is already there, so running it again is cheap.
#
# Prints the variables the tests read as `export` lines on stdout (everything else goes to stderr):
#   eval "$(.ci/docker-setup.sh)"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

BASE_IMAGE=${TAKEOFF_TEST_BASE_IMAGE:-takeoff-python:bookworm}
REGISTRY=${TAKEOFF_TEST_REGISTRY:-127.0.0.1:5000}
STATE=${TAKEOFF_DOCKER_STATE:-/var/lib/takeoff-ci}

say() { echo "docker-setup: $*" >&2; }

wait_until() {  # wait_until SECONDS COMMAND...: true once COMMAND succeeds, false after SECONDS
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi
mkdir -p "$STATE"

if ! docker info >/dev/null 2>&1; then
  # A dockerd killed with its machine's session leaves pid files that stop the next one from starting.
  for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
  done
  say "starting dockerd (log: $STATE/dockerd.log)"
  setsid nohup dockerd >"$STATE/dockerd.log" 2>&1 </dev/null &
  wait_until 60 docker info || { tail -n 20 "$STATE/dockerd.log" >&2; say "dockerd did not start"; exit 1; }
fi

if [[ -z "$(docker images -q "$BASE_IMAGE")" ]]; then
  say "making the base image $BASE_IMAGE with debootstrap (about a minute)"
  rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$STATE/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
  tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >&2
  rm -rf "$rootfs"
fi

if ! curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1; then
  say "starting docker-registry on $REGISTRY (log: $STATE/registry.log)"
  cat >"$STATE/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE/registry
http:
  addr: $REGISTRY
YAML
  setsid nohup docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 </dev/null &
  wait_until 30 curl -fsS "http://$REGISTRY/v2/" \
    || { tail -n 20 "$STATE/registry.log" >&2; say "docker-registry did not start"; exit 1; }
fi

echo "export TAKEOFF_TEST_DOCKER=1"
echo "export TAKEOFF_TEST_BASE_IMAGE=$BASE_IMAGE"
echo "export TAKEOFF_TEST_REGISTRY=$REGISTRY"
