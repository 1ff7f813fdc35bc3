#!/usr/bin/env bash
# Run JupyterHub's own test suite (the `jupyterhub.tests` package shipped with the installed
# `jupyterhub`) against hubproxy: JupyterHub starts whatever `configurable-http-proxy` is first on
# PATH, and this script makes sure that is hubproxy's (or Node CHP's, with --node, to compare a
# failure with the reference).
#
# Usage:
#   scripts/jupyterhub-suite.sh                 # test_proxy.py only (well under a minute; CI runs it)
#   scripts/jupyterhub-suite.sh --all           # the whole suite (~1,250 tests, 12+ minutes)
#   scripts/jupyterhub-suite.sh test_api test_pages          # some modules
#   scripts/jupyterhub-suite.sh test_proxy -- -k external    # extra pytest arguments after --
#   scripts/jupyterhub-suite.sh --node test_proxy            # the same against Node CHP
#   scripts/jupyterhub-suite.sh --subdomain test_proxy       # with subdomains (--host-routing)
#   scripts/jupyterhub-suite.sh --workers 2 test_proxy       # hubproxy run with --workers 2
#
# Environment: CHP_REF (default /work/chp-ref/node_modules/.bin) is where --node finds Node CHP;
# JHSUITE_TIMEOUT (default 120) is pytest-timeout's per-test limit, setup and teardown included
# (a test that fails may wait forever; stopping a single-user server that ignores SIGINT takes
# 30 to 60 s in test_singleuser's teardowns, so 60 s is too short); JHSUITE_JUNIT=<file> writes
# a JUnit XML report.
#
# Needs: pip install -e '.[integration]' (jupyterhub[test], jupyter_server, ipykernel, pytest-timeout).
# The subdomain tests need *.localhost.jovyan.org -> 127.0.0.1 from public DNS and skip without
# JUPYTERHUB_TEST_SUBDOMAIN_HOST; --subdomain sets it (on a free port) and resolves those names to
# 127.0.0.1 inside the test process (jupyterhub_suite/jhsuite_dns.py), so they run offline. The
# browser tests are deselected (they need Playwright's own Firefox build, not on the registries).
# The plugins in jupyterhub_suite/ add --allow-root to single-user servers when run as root, and
# restore SIGINT when the run was started with it ignored (a background job of a script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
proxy="hubproxy"
modules=()
extra=()
subdomain=0
workers=""
while (($#)); do
    case "$1" in
        --node) proxy="node"; shift ;;
        --all) modules=(ALL); shift ;;
        --subdomain) subdomain=1; shift ;;
        --workers) workers="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) modules+=("$1"); shift ;;
    esac
done
((${#modules[@]})) || modules=(test_proxy)

# --- which configurable-http-proxy JupyterHub will find -----------------------------------------
bindir="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
if [[ $proxy == node ]]; then
    chp_dir="${CHP_REF:-/work/chp-ref/node_modules/.bin}"
    [[ -x $chp_dir/configurable-http-proxy ]] || { echo "no Node CHP at $chp_dir" >&2; exit 2; }
    export PATH="$chp_dir:$PATH"
else
    # the console script installed with hubproxy sits next to the interpreter
    [[ -x $bindir/configurable-http-proxy ]] || {
        echo "hubproxy's configurable-http-proxy is not installed in $bindir (pip install -e .)" >&2
        exit 2
    }
    export PATH="$bindir:$PATH"
fi
found="$(command -v configurable-http-proxy)"
version="$(configurable-http-proxy --version)"
if [[ $proxy == hubproxy ]]; then
    "$python" - "$found" <<'EOF' || { echo "configurable-http-proxy on PATH ($found) is not hubproxy" >&2; exit 2; }
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
sys.exit(0 if "hubproxy" in text else 1)
EOF
fi
jh_version="$("$python" -c 'import jupyterhub; print(jupyterhub.__version__)')"
echo "jupyterhub-suite: JupyterHub $jh_version; proxy: $found (version $version)"

# --- run from an empty directory (JupyterHub's fixtures chdir to temporary dirs as well) ---------
work="$(mktemp -d "${TMPDIR:-/tmp}/jhsuite.XXXXXX")"
# Some of JupyterHub's tests leave single-user servers running (test_external_proxy never stops
# river's). They inherit PYTHONPATH, which carries this run's directory: at exit, stop exactly
# the processes whose PYTHONPATH names it.
cleanup() {
    local pid
    for pid in $(grep -lsF "PYTHONPATH=$work" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        [[ $pid != "$$" ]] && kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
if [[ -n $workers ]]; then
    [[ $proxy == hubproxy ]] || { echo "--workers is hubproxy's option, not Node CHP's" >&2; exit 2; }
    # JupyterHub runs `configurable-http-proxy <its options>`: this one adds --workers
    mkdir "$work/bin"
    printf '#!/bin/sh\nexec %q --workers %q "$@"\n' "$found" "$workers" >"$work/bin/configurable-http-proxy"
    chmod +x "$work/bin/configurable-http-proxy"
    export PATH="$work/bin:$PATH"
    echo "jupyterhub-suite: hubproxy with --workers $workers"
fi
targets=()
for m in "${modules[@]}"; do
    if [[ $m == ALL ]]; then
        targets+=(jupyterhub.tests)
    else
        targets+=("jupyterhub.tests.${m%.py}")
    fi
done
junit=()
[[ -n ${JHSUITE_JUNIT:-} ]] && junit=("--junitxml=$(realpath -m "$JHSUITE_JUNIT")")

if ((subdomain)); then
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    export JUPYTERHUB_TEST_SUBDOMAIN_HOST="http://localhost.jovyan.org:$port" JHSUITE_FAKE_DNS=1
    echo "jupyterhub-suite: subdomains, JUPYTERHUB_TEST_SUBDOMAIN_HOST=$JUPYTERHUB_TEST_SUBDOMAIN_HOST"
fi

cd "$work"
export PYTHONPATH="$work:$here/jupyterhub_suite${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m pytest -c "$here/jupyterhub_suite/pytest.ini" --rootdir "$work" \
    --timeout "${JHSUITE_TIMEOUT:-120}" "${junit[@]}" --pyargs "${targets[@]}" "${extra[@]}"
