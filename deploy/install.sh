#!/usr/bin/env bash
# Install linewatch as a systemd service on an edge box (run as root from the repository).
# Extras: postgres (the PostgreSQL driver) and text (the MiniLM sentence encoder the dqformer
# engine needs); GPU boxes: set EXTRAS=gpu,postgres,text to add TensorRT and pycuda.
set -euo pipefail
EXTRAS=${EXTRAS:-postgres,text}
PREFIX=/opt/linewatch
id linewatch >/dev/null 2>&1 || useradd --system --home /var/lib/linewatch --shell /usr/sbin/nologin linewatch
install -d -o linewatch -g linewatch /var/lib/linewatch
install -d /etc/linewatch
mkdir -p "$PREFIX" && cp -r . "$PREFIX/src"
# linewatch needs Python 3.11 or newer (Ubuntu 22.04's python3 is 3.10: install python3.11 and
# run with PYTHON=python3.11); the venv module is a separate package on Debian and Ubuntu
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "linewatch needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1); set PYTHON=python3.11" >&2; exit 1; }
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || {
    echo "$PYTHON has no venv/ensurepip: apt install python3-venv (or python3.11-venv)" >&2; exit 1; }
"$PYTHON" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install -q --upgrade pip
"$PREFIX/.venv/bin/pip" install -q "torch==2.13.0"
"$PREFIX/.venv/bin/pip" install -q "$PREFIX/src[$EXTRAS]"
[ -f /etc/linewatch/config.toml ] || install -m 0644 config.toml /etc/linewatch/config.toml
"$PREFIX/.venv/bin/linewatch" check-config /etc/linewatch/config.toml
install -m 0644 deploy/linewatch.service /etc/systemd/system/linewatch.service
systemctl daemon-reload
echo "installed; edit /etc/linewatch/config.toml, then: systemctl enable --now linewatch"
