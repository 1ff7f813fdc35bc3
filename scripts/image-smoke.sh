#!/usr/bin/env bash
# Smoke run of a built image, the way zero-to-jupyterhub runs CHP's: the chart's command and
# flags, uid 65534, a read-only root file system, no capabilities; then the image's own
# entrypoint. Run by .github/workflows/publish.yml for each platform before anything is pushed.
#
# It needs a container engine. CI (.ci/run) has none: it checks the same things on the wheel
# installed into a read-only prefix and run as uid 65534 (tests/test_container.py).
#
# Usage: scripts/image-smoke.sh IMAGE [PLATFORM]      (PLATFORM: linux/amd64 by default)
set -euo pipefail

IMAGE=$1
PLATFORM=${2:-linux/amd64}
ID="hubproxy-smoke-$$"
NET="$ID-net"
TOKEN=$(openssl rand -hex 16)
WORK=$(mktemp -d)
STARTED=()

say() { printf '\n== %s\n' "$*"; }
fail() {
    printf 'FAILED: %s\n' "$*" >&2
    for c in "${STARTED[@]}"; do
        printf -- '--- docker logs %s\n' "$c" >&2
        docker logs "$c" >&2 || true
    done
    exit 1
}
cleanup() {
    for c in "${STARTED[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
    docker network rm "$NET" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# the pod's security context in the chart, plus a read-only root file system
HARDENED=(--read-only --user 65534:65534 --cap-drop ALL --security-opt no-new-privileges)

start() {  # start NAME [docker run options...] -- [image arguments...]
    local name=$1
    shift
    local opts=()
    while [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    docker run -d --platform "$PLATFORM" --name "$name" --network "$NET" "${HARDENED[@]}" \
        "${opts[@]}" "$IMAGE" "$@" >/dev/null
    STARTED+=("$name")
}

host_port() {  # host_port CONTAINER PORT: the loopback port Docker published it on
    local mapping
    mapping=$(docker port "$1" "$2/tcp")
    mapping=${mapping%%$'\n'*}
    printf '%s\n' "${mapping##*:}"
}

logs_have() {  # logs_have CONTAINER REGEX (the logs read whole: no pipe for pipefail to trip)
    local logs
    logs=$(docker logs "$1" 2>&1)
    grep -qE "$2" <<<"$logs"
}

wait_healthy() {  # wait_healthy URL [curl options]: a readiness probe, at most 120 tries
    local url=$1
    shift
    for _ in $(seq 120); do
        if curl -fsS --max-time 1 "$@" "$url" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    fail "no answer from $url"
}

stop_cleanly() {  # stop_cleanly CONTAINER: SIGTERM (docker stop), exit 0 well inside 60 s
    local t0 t1 code
    t0=$(date +%s)
    docker stop -t 60 "$1" >/dev/null
    t1=$(date +%s)
    code=$(docker inspect -f '{{.State.ExitCode}}' "$1")
    [[ $code == 0 ]] || fail "$1 exited $code after SIGTERM"
    (( t1 - t0 < 15 )) || fail "$1 took $((t1 - t0)) s to stop"
    if logs_have "$1" 'Traceback|Read-only file system|Permission denied'; then
        fail "$1 logged an error"
    fi
}

docker network create "$NET" >/dev/null

say "version"
version=$(docker run --rm --platform "$PLATFORM" "${HARDENED[@]}" "$IMAGE" --version)
expected=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
[[ $version == "$expected" ]] || fail "--version says $version, pyproject.toml $expected"

say "a stand-in hub (the image's Python serving a directory listing) as 'hub'"
start "$ID-hub" --network-alias hub --entrypoint python -- -m http.server 8081

say "zero-to-jupyterhub, HTTP: the chart's command and flags"
start "$ID-http" -e CONFIGPROXY_AUTH_TOKEN="$TOKEN" -p 127.0.0.1::8000 -p 127.0.0.1::8001 \
    --entrypoint configurable-http-proxy -- \
    --ip= --api-ip= --api-port=8001 --default-target=http://hub:8081 \
    --error-target=http://hub:8081/hub/error --port=8000 --log-level=debug
public=$(host_port "$ID-http" 8000)
api=$(host_port "$ID-http" 8001)
wait_healthy "http://127.0.0.1:$public/_chp_healthz"
for _ in 1 2 3 4 5; do  # the readiness probe's own timeout is 1 s
    curl -fsS --max-time 1 "http://127.0.0.1:$public/_chp_healthz" >/dev/null || fail "healthz"
done
# from outside the container, as the hub pod reaches it through the proxy-api Service
routes=$(curl -fsS --max-time 5 -H "Authorization: token $TOKEN" \
    "http://127.0.0.1:$api/api/routes") || fail "the API is not reachable from outside"
[[ $routes == *'"/"'* ]] || fail "no default route: $routes"
curl -fsS --max-time 5 "http://127.0.0.1:$public/" >/dev/null || fail "not proxied to the hub"
stop_cleanly "$ID-http"

say "zero-to-jupyterhub, HTTPS: --port=8443 --redirect-port=8000 --redirect-to=443, a Secret"
mkdir -p "$WORK/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$WORK/tls/tls.key" -out "$WORK/tls/tls.crt" 2>/dev/null
chmod 0755 "$WORK/tls" && chmod 0644 "$WORK/tls/tls.key" "$WORK/tls/tls.crt"  # a Secret's modes
start "$ID-https" -e CONFIGPROXY_AUTH_TOKEN="$TOKEN" -v "$WORK/tls:/etc/chp/tls:ro" \
    -p 127.0.0.1::8443 -p 127.0.0.1::8000 --entrypoint configurable-http-proxy -- \
    --ip= --api-ip= --api-port=8001 --default-target=http://hub:8081 \
    --error-target=http://hub:8081/hub/error --port=8443 --redirect-port=8000 \
    --redirect-to=443 --ssl-key=/etc/chp/tls/tls.key --ssl-cert=/etc/chp/tls/tls.crt
https=$(host_port "$ID-https" 8443)
redirect=$(host_port "$ID-https" 8000)
wait_healthy "https://127.0.0.1:$https/_chp_healthz" -k
answer=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code} %{redirect_url}' \
    -H 'Host: hub.example.org' "http://127.0.0.1:$redirect/user/x?y=1")
[[ $answer == "301 https://hub.example.org/user/x?y=1" ]] || fail "redirect: $answer"
fingerprint() {
    local pem
    pem=$(openssl s_client -connect "127.0.0.1:$https" </dev/null 2>/dev/null) || true
    openssl x509 -noout -fingerprint -sha256 <<<"$pem"
}
before=$(fingerprint)
# a renewed certificate: written in place, as the kubelet updates a mounted Secret
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/new.key" -out "$WORK/new.crt" 2>/dev/null
chmod 0644 "$WORK/new.key" "$WORK/new.crt"
mv "$WORK/new.key" "$WORK/tls/tls.key" && mv "$WORK/new.crt" "$WORK/tls/tls.crt"
rotated=""
for _ in $(seq 40); do  # the files are checked every 2 s
    if [[ $(fingerprint) != "$before" ]]; then rotated=yes; break; fi
    sleep 0.5
done
[[ -n $rotated ]] || fail "the renewed certificate was not picked up"
stop_cleanly "$ID-https"

say "the image's entrypoint: --api-ip=0.0.0.0 by default, CONFIGPROXY_AUTH_TOKEN_FILE"
printf '%s\n' "$TOKEN" >"$WORK/token" && chmod 0644 "$WORK/token"
start "$ID-entry" -e CONFIGPROXY_AUTH_TOKEN_FILE=/run/token -v "$WORK/token:/run/token:ro" \
    -p 127.0.0.1::8000 -p 127.0.0.1::8001 -- --default-target=http://hub:8081
public=$(host_port "$ID-entry" 8000)
api=$(host_port "$ID-entry" 8001)
wait_healthy "http://127.0.0.1:$public/_chp_healthz"
code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$api/api/routes")
[[ $code == 403 ]] || fail "API without the token: $code"
curl -fsS --max-time 5 -H "Authorization: token $TOKEN" "http://127.0.0.1:$api/api/routes" \
    >/dev/null || fail "API with the token from the file"
stop_cleanly "$ID-entry"

say "--workers auto counts the container's CPU quota"
start "$ID-one" --cpus 1 -- --default-target=http://hub:8081 --workers auto
start "$ID-two" --cpus 2 -- --default-target=http://hub:8081 --workers auto
for c in "$ID-one" "$ID-two"; do
    for _ in $(seq 120); do
        if logs_have "$c" 'Proxy API at'; then break; fi
        sleep 0.5
    done
done
logs_have "$ID-one" 'Proxy API at' || fail "1 CPU: did not start"
if logs_have "$ID-one" 'worker processes'; then fail "1 CPU: workers started"; fi
if [[ $(nproc) -ge 2 ]]; then
    logs_have "$ID-two" 'Serving with 2 worker processes' || fail "2 CPUs: not 2 workers"
fi
stop_cleanly "$ID-one"
stop_cleanly "$ID-two"

say "all checks passed ($IMAGE, $PLATFORM)"
