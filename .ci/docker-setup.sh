#!/usr/bin/env bash
# Docker for the builder and runner tests on a Debian machine: the engine, a local Python base image (there
# is no registry to pull one from), a registry on loopback to push to, and a second one that wants a login
# (htpasswd, bcrypt) holding one private image. Each step is skipped when its result is already there, so
# running it again is cheap.
#
# Prints the variables the tests read as `export` lines on stdout (everything else goes to stderr):
#   eval "$(.ci/docker-setup.sh)"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

BASE_IMAGE=${TAKEOFF_TEST_BASE_IMAGE:-takeoff-python:bookworm}
# Takeoff's own image (Dockerfile) needs Python >= 3.11.4 (tarfile's extraction filters): bookworm has 3.11.2.
SERVICE_BASE_IMAGE=${TAKEOFF_TEST_SERVICE_BASE_IMAGE:-takeoff-python:trixie}
REGISTRY=${TAKEOFF_TEST_REGISTRY:-127.0.0.1:5000}
AUTH_REGISTRY=${TAKEOFF_TEST_AUTH_REGISTRY:-127.0.0.1:5001}
# Test-only credentials of a registry that listens on loopback and holds nothing but a retagged base image.
AUTH_USER=takeoff-test
AUTH_PASSWORD=takeoff-test-password
PRIVATE_IMAGE=$AUTH_REGISTRY/takeoff-test/private:1
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
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v curl >/dev/null || missing+=(curl)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
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

make_base_image() {  # make_base_image IMAGE SUITE: a minimal Debian SUITE with python3, venv and pip
  [[ -n "$(docker images -q "$1")" ]] && return
  say "making the base image $1 with debootstrap (about a minute)"
  local rootfs
  rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$2" "$rootfs" >"$STATE/debootstrap-$2.log" 2>&1 \
    || { tail -n 20 "$STATE/debootstrap-$2.log" >&2; say "debootstrap of $2 failed"; exit 1; }
  tar -C "$rootfs" -c . | docker import - "$1" >&2
  rm -rf "$rootfs"
}
make_base_image "$BASE_IMAGE" bookworm
make_base_image "$SERVICE_BASE_IMAGE" trixie

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

auth_registry_up() { [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$AUTH_REGISTRY/v2/") == 401 ]]; }
if ! auth_registry_up; then
  say "starting docker-registry with htpasswd auth on $AUTH_REGISTRY (log: $STATE/auth-registry.log)"
  htpasswd -Bbc "$STATE/auth-registry.htpasswd" "$AUTH_USER" "$AUTH_PASSWORD" 2>/dev/null
  cat >"$STATE/auth-registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE/auth-registry
http:
  addr: $AUTH_REGISTRY
auth:
  htpasswd:
    realm: takeoff-test
    path: $STATE/auth-registry.htpasswd
YAML
  setsid nohup docker-registry serve "$STATE/auth-registry.yml" >"$STATE/auth-registry.log" 2>&1 </dev/null &
  wait_until 30 auth_registry_up \
    || { tail -n 20 "$STATE/auth-registry.log" >&2; say "the registry with auth did not start"; exit 1; }
fi

# The engine is given the login for this one push only (a throwaway config), never a stored `docker login`,
# so tests that expect a refusal without credentials get one.
private_repository=${PRIVATE_IMAGE%:*}
if ! curl -fsS -u "$AUTH_USER:$AUTH_PASSWORD" "http://$AUTH_REGISTRY/v2/${private_repository#*/}/manifests/${PRIVATE_IMAGE##*:}" \
  -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' >/dev/null 2>&1; then
  say "pushing $PRIVATE_IMAGE"
  login=$(mktemp -d)
  docker tag "$BASE_IMAGE" "$PRIVATE_IMAGE"
  echo "$AUTH_PASSWORD" | docker --config "$login" login -u "$AUTH_USER" --password-stdin "$AUTH_REGISTRY" >&2
  docker --config "$login" push -q "$PRIVATE_IMAGE" >&2
  rm -rf "$login"
  docker rmi "$PRIVATE_IMAGE" >/dev/null  # tests pull it; the base image keeps its own tag
fi

echo "export TAKEOFF_TEST_DOCKER=1"
echo "export TAKEOFF_TEST_BASE_IMAGE=$BASE_IMAGE"
echo "export TAKEOFF_TEST_SERVICE_BASE_IMAGE=$SERVICE_BASE_IMAGE"
echo "export TAKEOFF_TEST_REGISTRY=$REGISTRY"
echo "export TAKEOFF_TEST_AUTH_REGISTRY=$AUTH_REGISTRY"
echo "export TAKEOFF_TEST_AUTH_USER=$AUTH_USER"
echo "export TAKEOFF_TEST_AUTH_PASSWORD=$AUTH_PASSWORD"
echo "export TAKEOFF_TEST_PRIVATE_IMAGE=$PRIVATE_IMAGE"
