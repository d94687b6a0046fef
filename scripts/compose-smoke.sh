#!/usr/bin/env bash
# Smoke test of the docker compose deployment: build, start, wait for healthy, train a model
# through the published gRPC port with the Python client, predict over REST, restart the stack
# (down, up) and check the saved version survived in the volume, then `down -v`.
#
#   BASE_IMAGE=python:3.12-slim bash scripts/compose-smoke.sh
#
# Needs a docker daemon, docker-compose (1.29) or `docker compose` (v2), and a Python with
# propserve's clients (the repository's .venv, or PYTHON=/path/to/python). Runs as its own
# compose project with its own generated env file and published ports, so it touches neither
# .env nor a running stack; it removes what it started, volume included, whatever happens.
# Prints one line per check and ends with "N passed, N failed".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

# Every step below needs the Python with the clients (ports, tokens, the checks): say so
# at once when it is missing, rather than failing later without a word.
if ! PYTHONPATH="$ROOT" "$PYTHON" -c 'import numpy, propserve.clients' >/dev/null 2>&1; then
  echo "FAIL  no usable Python at $PYTHON (it needs propserve's clients): run" \
    "python3 -m venv .venv && .venv/bin/pip install -e . in $ROOT, or set PYTHON=/path/to/python"
  echo "0 passed, 1 failed"
  exit 1
fi

PROJECT="${SMOKE_PROJECT:-propserve-smoke-$$}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-180}"
WORK="$(mktemp -d)"
passed=0
failed=0
started=0

if command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  echo "FAIL  no docker-compose or docker compose found"
  echo "0 passed, 1 failed"
  exit 1
fi

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

REST_PORT="$(free_port)"
GRPC_PORT="$(free_port)"
ADMIN_TOKEN="smoke-admin-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(12))')"
PREDICT_TOKEN="smoke-predict-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(12))')"
cat >"$WORK/.env" <<EOF
PROPSERVE_TOKENS=$ADMIN_TOKEN=admin;$PREDICT_TOKEN=predict
BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim}
PIP_INDEX_URL=${PIP_INDEX_URL:-}
PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}
PUBLISH_HOST=127.0.0.1
PUBLISH_REST_PORT=$REST_PORT
PUBLISH_GRPC_PORT=$GRPC_PORT
EOF

compose() {
  "${COMPOSE[@]}" --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" \
    --env-file "$WORK/.env" -p "$PROJECT" "$@"
}

cleanup() {
  if [ "$started" = 1 ]; then
    compose down -v --remove-orphans >"$WORK/cleanup.log" 2>&1 \
      || { echo "cleanup: compose down -v failed:"; tail -n 20 "$WORK/cleanup.log"; }
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check() {  # check NAME COMMAND...: run it, print one line, count it; output goes to a log
  local name="$1"
  shift
  local log="$WORK/check-$((passed + failed)).log"
  local start=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    printf 'ok    %-48s %3ss %s\n' "$name" "$((SECONDS - start))" "$(tail -n 1 "$log")"
    return 0
  fi
  failed=$((failed + 1))
  printf 'FAIL  %-48s %3ss\n' "$name" "$((SECONDS - start))"
  sed 's/^/      | /' "$log" | tail -n 25
  return 1
}

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit $?
}

container_id() {
  compose ps -q propserve
}

wait_healthy() {
  local deadline=$((SECONDS + HEALTH_TIMEOUT)) id status
  while [ $SECONDS -lt $deadline ]; do
    id="$(container_id)"
    if [ -n "$id" ]; then
      status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null)"
      case "$status" in
        healthy) echo "healthy after $((SECONDS + HEALTH_TIMEOUT - deadline))s"; return 0 ;;
        unhealthy | none) break ;;
      esac
    fi
    sleep 2
  done
  echo "not healthy within ${HEALTH_TIMEOUT}s (status: ${status:-no container})"
  [ -n "${id:-}" ] && docker logs --tail 30 "$id"
  return 1
}

client() {  # client STEP: the Python half, talking to the published ports with the clients
  PYTHONPATH="$ROOT" "$PYTHON" - "$1" <<EOF
import sys
from pathlib import Path

import numpy as np

from propserve.clients import GrpcClient, PermissionDenied, RestClient, Unauthenticated

step = sys.argv[1]
grpc = GrpcClient("127.0.0.1:$GRPC_PORT", token="$ADMIN_TOKEN", timeout=30)
rest = RestClient("http://127.0.0.1:$REST_PORT", token="$PREDICT_TOKEN", timeout=30)
saved = Path("$WORK/predictions.npy")
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 4)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
probe = x[:16]

if step == "train":
    spec = {
        "input_dim": 4,
        "layers": [{"units": 16, "activation": "relu"}, {"units": 3}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    grpc.create_model("smoke", spec)
    batches = [(x[i : i + 64], y[i : i + 64]) for _ in range(10) for i in range(0, 512, 64)]
    history = grpc.train("smoke", batches)
    version = grpc.save_version("smoke")
    grpc.set_label("smoke", "stable", version.version)
    assert len(history) == 80 and history[-1].step == 80, history[-1]
    assert history[-1].loss < history[0].loss, (history[0].loss, history[-1].loss)
    print(f"80 steps over gRPC, loss {history[0].loss:.3f} -> {history[-1].loss:.3f}, "
          f"version {version.version} labelled stable")
elif step == "predict":
    prediction = rest.predict("smoke", probe, label="stable")
    assert prediction.outputs.shape == (16, 3) and prediction.version == 1, prediction
    accuracy = float(np.mean(prediction.outputs.argmax(axis=1) == y[:16]))
    np.save(saved, prediction.outputs)
    try:
        rest.train_step("smoke", probe, y[:16])
    except PermissionDenied:
        pass
    else:
        raise AssertionError("a predict token could train")
    try:
        RestClient("http://127.0.0.1:$REST_PORT", timeout=10).list_models()
    except Unauthenticated:
        pass
    else:
        raise AssertionError("no token was accepted")
    print(f"REST predict by label: (16, 3), accuracy {accuracy:.2f}; "
          "predict token cannot train; no token refused")
elif step == "after-restart":
    versions = grpc.list_versions("smoke")
    assert [(v.version, v.labels) for v in versions] == [(1, ("stable",))], versions
    model = grpc.get_model("smoke")
    assert model.head_step == 80 and model.labels == {"stable": 1}, model
    prediction = rest.predict("smoke", probe, label="stable")
    np.testing.assert_array_equal(prediction.outputs, np.load(saved))
    print("version 1 (stable) and head step 80 came back from the volume; same predictions")
else:
    raise SystemExit(f"unknown step {step}")
EOF
}

volume_exists() {
  docker volume ls -q | grep -qx "${PROJECT}_propserve-data" && echo "${PROJECT}_propserve-data"
}

volume_gone() {
  ! docker volume ls -q | grep -qx "${PROJECT}_propserve-data" && echo "volume removed"
}

echo "compose: ${COMPOSE[*]}; project $PROJECT; base image ${BASE_IMAGE:-python:3.12-slim}"
echo "ports: REST 127.0.0.1:$REST_PORT, gRPC 127.0.0.1:$GRPC_PORT"

check "build the image" compose build || finish
started=1
check "up -d" compose up -d || finish
check "healthy (docker inspect)" wait_healthy || finish
check "train over gRPC, save, label stable" client train || finish
check "predict over REST by label, tokens enforced" client predict || finish
check "down (keeping the volume)" compose down
check "volume kept" volume_exists
check "up -d again" compose up -d || finish
check "healthy again" wait_healthy || finish
check "versions and predictions survive the restart" client after-restart
check "down -v" compose down -v --remove-orphans && started=0
check "volume removed" volume_gone
finish
