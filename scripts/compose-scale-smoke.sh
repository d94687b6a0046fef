#!/usr/bin/env bash
# Smoke test of the read-replica deployment (docker-compose.replicas.yml): build, start a
# writer, two replicas and the load balancer, train a model through the balancer, and check
# that every replica serves each version the writer labels within 2 s; that the balancer sends
# predictions (REST, OIP REST, gRPC, OIP gRPC) to the replicas and nothing else; that a third
# replica takes its share once scaled up; and that a prediction load through the balancer
# sees no failed request while replicas are scaled down, killed and started again, the
# revived one catching up with a version saved while it was down. Then `down -v`.
#
#   BASE_IMAGE=python:3.12-slim NGINX_BASE_IMAGE=nginx:1.27-bookworm \
#     bash scripts/compose-scale-smoke.sh
#
# Needs a docker daemon, docker-compose (1.29) or `docker compose` (v2; COMPOSE="docker
# compose" picks it when both are installed), and a Python with propserve's clients (the
# repository's .venv, or PYTHON=/path/to/python). Runs as its own compose project with its
# own generated env file and published ports, so it touches neither .env nor a running stack;
# it removes what it started, volume included, whatever happens. Prints one line per check
# and ends with "N passed, N failed".
# shellcheck disable=SC2317  # the functions run through check, trap and command substitution
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
COMPOSE_FILE="$ROOT/docker-compose.replicas.yml"

say_fail() {  # say_fail MESSAGE: the one line of a check that could not even start
  echo "FAIL  $1"
  echo "0 passed, 1 failed"
  exit 1
}

if ! PYTHONPATH="$ROOT" "$PYTHON" -c 'import numpy, propserve.clients' >/dev/null 2>&1; then
  say_fail "no usable Python at $PYTHON (it needs propserve's clients): run \
python3 -m venv .venv && .venv/bin/pip install -e . in $ROOT, or set PYTHON=/path/to/python"
fi
command -v docker >/dev/null 2>&1 \
  || say_fail "no docker command: install docker (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 \
  || say_fail "the docker daemon does not answer: start it (systemctl start docker, or dockerd)"

if [ -n "${COMPOSE:-}" ]; then
  read -r -a COMPOSE <<<"$COMPOSE"
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  say_fail "no docker-compose or docker compose found (Debian: apt-get install docker-compose)"
fi
COMPOSE_VERSION="$("${COMPOSE[@]}" version --short 2>/dev/null || echo unknown)"

PROJECT="${SMOKE_PROJECT:-propserve-scale-smoke-$$}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-180}"
LAG_LIMIT=2
WORK="$(mktemp -d)"
passed=0
failed=0
started=0

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
NGINX_BASE_IMAGE=${NGINX_BASE_IMAGE:-nginx:1.27-bookworm}
PIP_INDEX_URL=${PIP_INDEX_URL:-}
PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}
PUBLISH_HOST=127.0.0.1
PUBLISH_REST_PORT=$REST_PORT
PUBLISH_GRPC_PORT=$GRPC_PORT
PROPSERVE_POLL_INTERVAL=0.5
EOF

compose() {
  "${COMPOSE[@]}" --project-directory "$ROOT" -f "$COMPOSE_FILE" \
    --env-file "$WORK/.env" -p "$PROJECT" "$@"
}

load_pid=""
cleanup() {
  stop_pollers
  if [ -n "$load_pid" ]; then  # the load stops at its next request
    touch "$WORK/stop-load"
    wait "$load_pid" 2>/dev/null
  fi
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
    printf 'ok    %-52s %3ss %s\n' "$name" "$((SECONDS - start))" "$(tail -n 1 "$log")"
    return 0
  fi
  failed=$((failed + 1))
  printf 'FAIL  %-52s %3ss\n' "$name" "$((SECONDS - start))"
  sed 's/^/      | /' "$log" | tail -n 25
  return 1
}

finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit $?
}

# -- containers -----------------------------------------------------------------------------

containers() {  # containers SERVICE: ids of the service's running containers, by number
  docker ps --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" \
    --format '{{.Label "com.docker.compose.container-number"}} {{.ID}}' \
    | sort -n | awk '{print $2}'
}

ip_of() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"
}

wait_healthy() {  # wait_healthy [ID...]: every running container of the project, or those
  local deadline=$((SECONDS + HEALTH_TIMEOUT)) ids id status waiting
  while ((SECONDS < deadline)); do
    if [ $# -gt 0 ]; then
      ids="$*"
    else
      ids="$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT")"
    fi
    waiting=""
    for id in $ids; do
      status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null)"
      case "$status" in
        healthy) ;;
        unhealthy | none)
          echo "$(docker inspect -f '{{.Name}}' "$id") is $status"
          docker logs --tail 30 "$id" 2>&1
          return 1
          ;;
        *) waiting="$waiting $id" ;;
      esac
    done
    if [ -n "$ids" ] && [ -z "$waiting" ]; then
      echo "$(echo "$ids" | wc -w) containers healthy after $((SECONDS + HEALTH_TIMEOUT - deadline))s"
      return 0
    fi
    sleep 1
  done
  echo "not healthy within ${HEALTH_TIMEOUT}s:${waiting:- no containers}"
  for id in $waiting; do docker logs --tail 30 "$id" 2>&1; done
  return 1
}

# -- the Python halves -----------------------------------------------------------------------

# Run inside a server's container (its image has the clients), against 127.0.0.1: what that
# one process serves, without the balancer in between.
INSIDE_PY='
import json, os, re, sys, time, urllib.request

import numpy as np

from propserve.clients import FailedPrecondition, GrpcClient, NotFound, RestClient, RetryPolicy

step = sys.argv[1]
once = RetryPolicy(attempts=1)
rest = RestClient("http://127.0.0.1:8000", token=os.environ["SMOKE_TOKEN"], timeout=10, retry=once)
probe = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)

if step == "poll":  # poll VERSION: wait for the stable label to name it; print when it did
    version, deadline, said = int(sys.argv[2]), time.time() + 30, False
    while time.time() < deadline:
        try:
            seen = rest.predict("smoke", probe, label="stable").version
        except NotFound:
            seen = None
        if not said:
            print("polling", flush=True)
            said = True
        if seen == version:
            print(json.dumps({"seen": time.time()}), flush=True)
            break
        time.sleep(0.02)
    else:
        raise SystemExit(f"version {version} not served by label within 30 s (last: {seen})")
elif step == "serves":  # serves VERSION: by label, and by default (no version, no label)
    version = int(sys.argv[2])
    by_label = rest.predict("smoke", probe, label="stable").version
    by_default = rest.predict("smoke", probe).version
    assert by_label == by_default == version, (by_label, by_default, version)
    print(f"serves version {version} by label and by default")
elif step == "predictions":  # predictions answered so far (any transport, any protocol)
    text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=5).read().decode()
    pattern = r"^propserve_requests_total\{([^}]*)\} (\S+)$"
    print(int(sum(float(value) for labels, value in re.findall(pattern, text, re.M)
                  if re.search(r"method=\"(Predict|ModelInfer)\"", labels))))
elif step == "refuses":  # a replica refuses changes on both transports, naming the writer
    grpc = GrpcClient("127.0.0.1:50051", token=os.environ["SMOKE_TOKEN"], timeout=10, retry=once)
    for client in (rest, grpc):
        try:
            client.train_step("smoke", probe, np.zeros(16, dtype=np.int64))
        except FailedPrecondition as exc:
            assert "http://writer:8000" in str(exc), exc
            message = str(exc)
        else:
            raise AssertionError("a replica trained")
    print(f"TrainStep refused on REST and gRPC: {message[:90]}")
else:
    raise SystemExit(f"unknown step {step}")
'

inside() {  # inside ID STEP [ARG]: INSIDE_PY in that container, with the admin token
  docker exec -i -e SMOKE_TOKEN="$ADMIN_TOKEN" "$1" python - "${@:2}" <<<"$INSIDE_PY"
}

# Run here, through the published ports of the balancer.
client() {  # client STEP [ARG]
  PYTHONPATH="$ROOT" "$PYTHON" - "$@" <<EOF
import json
import sys
import threading
import time
from pathlib import Path

import grpc as grpcio
import httpx
import numpy as np

from propserve.clients import (
    GrpcClient,
    NotFound,
    PermissionDenied,
    RestClient,
    RetryPolicy,
    Unauthenticated,
)
from propserve.oip import open_inference_pb2 as oip

step, args = sys.argv[1], sys.argv[2:]
work = Path("$WORK")
rest_url, grpc_target = "http://127.0.0.1:$REST_PORT", "127.0.0.1:$GRPC_PORT"
once = RetryPolicy(attempts=1)
grpc = GrpcClient(grpc_target, token="$ADMIN_TOKEN", timeout=30, retry=once)
rest = RestClient(rest_url, token="$ADMIN_TOKEN", timeout=30, retry=once)
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 4)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
probe = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)


def train_more(steps):
    losses = [rest.train_step("smoke", x[i : i + 64], y[i : i + 64]).loss
              for i in range(0, 64 * steps, 64)]
    return losses


if step == "train":
    spec = {
        "input_dim": 4,
        "layers": [{"units": 16, "activation": "relu"}, {"units": 3}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    rest.create_model("smoke", spec)
    batches = [(x[i : i + 64], y[i : i + 64]) for _ in range(5) for i in range(0, 512, 64)]
    history = grpc.train("smoke", batches)
    losses = train_more(5)
    version = grpc.save_version("smoke").version
    assert version == 1 and history[-1].step == 40, (version, history[-1])
    print(f"created over REST, 40 steps over a gRPC stream and 5 REST TrainSteps "
          f"(loss {history[0].loss:.3f} -> {losses[-1]:.3f}), saved version {version}")
elif step == "train-more":
    losses = train_more(8)
    version = rest.save_version("smoke").version
    print(f"8 more REST TrainSteps (loss {losses[-1]:.3f}), saved version {version}")
elif step == "label":  # label VERSION: point stable at it; when it was done goes to a file
    version = int(args[0])
    model = rest.set_label("smoke", "stable", version)
    (work / "labelled-at").write_text(str(time.time()))
    assert model.labels["stable"] == version, model
    print(f"stable -> version {version}")
elif step == "poll":  # poll VERSION: until 20 answers in a row through the balancer name it
    version, deadline, said, streak = int(args[0]), time.time() + 30, False, 0
    predict = RestClient(rest_url, token="$PREDICT_TOKEN", timeout=10, retry=once)
    while time.time() < deadline and streak < 20:
        try:
            seen = predict.predict("smoke", probe, label="stable").version
        except NotFound:
            seen = None
        if not said:
            print("polling", flush=True)
            said = True
        streak = streak + 1 if seen == version else 0
        if streak == 1:
            first = time.time()
        time.sleep(0.005)
    if streak < 20:
        raise SystemExit(f"version {version} not served by label within 30 s (last: {seen})")
    print(json.dumps({"seen": first}), flush=True)
elif step == "through-lb":  # through-lb VERSION: every prediction protocol, and the tokens
    version = int(args[0])
    predict = RestClient(rest_url, token="$PREDICT_TOKEN", timeout=30, retry=once)
    by_rest = predict.predict("smoke", probe, label="stable")
    grpc_predict = GrpcClient(grpc_target, token="$PREDICT_TOKEN", timeout=30, retry=once)
    by_grpc = grpc_predict.predict("smoke", probe, label="stable")
    headers = {"authorization": "Bearer $PREDICT_TOKEN"}
    body = {"inputs": [{"name": "inputs", "shape": [16, 4], "datatype": "FP32",
                        "data": probe.ravel().tolist()}]}
    answer = httpx.post(f"{rest_url}/v2/models/smoke/versions/stable/infer", json=body,
                        headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    oip_rest = answer.json()
    by_oip_rest = np.array(oip_rest["outputs"][0]["data"], dtype=np.float32).reshape(16, 3)
    channel = grpcio.insecure_channel(grpc_target)
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=oip.ModelInferRequest.SerializeToString,
        response_deserializer=oip.ModelInferResponse.FromString,
    )
    request = oip.ModelInferRequest(model_name="smoke", model_version="stable")
    request.inputs.add(name="inputs", datatype="FP32", shape=[16, 4])
    request.raw_input_contents.append(probe.astype("<f4").tobytes())
    reply = infer(request, metadata=[("authorization", "Bearer $PREDICT_TOKEN")], timeout=30)
    by_oip_grpc = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(16, 3)
    versions = (by_rest.version, by_grpc.version, oip_rest["model_version"], reply.model_version)
    assert [str(v) for v in versions] == [str(version)] * 4, versions
    for other in (by_grpc.outputs, by_oip_rest, by_oip_grpc):
        np.testing.assert_allclose(other, by_rest.outputs, rtol=1e-5, atol=1e-6)
    try:
        predict.train_step("smoke", probe, y[:16])
    except PermissionDenied:
        pass
    else:
        raise AssertionError("a predict token could train")
    try:
        RestClient(rest_url, timeout=10, retry=once).predict("smoke", probe)
    except Unauthenticated:
        pass
    else:
        raise AssertionError("no token was accepted")
    print(f"version {version} by REST, gRPC, OIP REST and OIP gRPC (same outputs); "
          "predict token cannot train; no token refused")
elif step == "burst":  # burst N: N REST predictions through the balancer
    for _ in range(int(args[0])):
        rest.predict("smoke", probe, label="stable")
    print(f"{args[0]} predictions")
elif step == "load":  # until work/stop-load exists (at most 10 minutes); results to load.json
    counts = {"rest": [0, 0], "grpc": [0, 0]}
    errors, versions, retried = [], set(), []

    class Counted(RetryPolicy):
        def delay(self, attempt, error=None):
            retried.append(repr(error)[:200])
            return super().delay(attempt, error)

    def run(transport, client):
        deadline = time.time() + 600
        while not (work / "stop-load").exists() and time.time() < deadline:
            try:
                versions.add(client.predict("smoke", probe, label="stable").version)
                counts[transport][0] += 1
            except Exception as exc:  # every failure counts, whatever it is
                counts[transport][1] += 1
                errors.append(f"{transport}: {exc!r}"[:300])
            time.sleep(0.002)

    # REST without client retries: nginx alone must hide a replica going away. gRPC with the
    # clients' own policy: nginx cannot resend a call it already streamed to a replica that
    # died, and the clients retry Predict on UNAVAILABLE.
    loops = [
        threading.Thread(target=run, args=("rest", RestClient(
            rest_url, token="$PREDICT_TOKEN", timeout=30, retry=once))),
        threading.Thread(target=run, args=("grpc", GrpcClient(
            grpc_target, token="$PREDICT_TOKEN", timeout=30, retry=Counted()))),
    ]
    for loop in loops:
        loop.start()
    (work / "load-started").touch()
    for loop in loops:
        loop.join()
    result = {"counts": counts, "errors": errors[:10], "versions": sorted(versions),
              "grpc_retried": retried[:10], "grpc_retries": len(retried)}
    (work / "load.json").write_text(json.dumps(result))
elif step == "load-result":  # load-result RETRIED VERSIONS...: no failure, every version seen
    args_retried, args = args[0], args[1:]
    result = json.loads((work / "load.json").read_text())
    (rest_ok, rest_failed), (grpc_ok, grpc_failed) = result["counts"].values()
    for line in result["errors"] + [f"grpc client retried: {r}" for r in result["grpc_retried"]]:
        print(line)
    assert rest_failed == 0 and grpc_failed == 0, result["counts"]
    assert rest_ok > 100 and grpc_ok > 100, result["counts"]
    assert result["versions"] == [int(v) for v in args], result["versions"]
    print(f"REST {rest_ok} ok / {rest_failed} failed (no client retries), gRPC {grpc_ok} ok / "
          f"{grpc_failed} failed (client retries: {result['grpc_retries']}); versions seen "
          f"{result['versions']}; requests nginx sent to a second server: {args_retried}")
else:
    raise SystemExit(f"unknown step {step}")
EOF
}

# -- checks ----------------------------------------------------------------------------------

read_only_store() {  # the writer mounts the volume read-write, every replica read-only
  local writer volume id mount
  writer="$(containers writer)"
  if [ -z "$writer" ] || [ -z "$(containers replica)" ]; then echo "no writer or no replica"; return 1; fi
  volume="$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}} {{.RW}}{{end}}{{end}}' "$writer")"
  [ "$volume" = "${PROJECT}_propserve-data true" ] || { echo "writer: $volume"; return 1; }
  for id in $(containers replica); do
    mount="$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}} {{.RW}}{{end}}{{end}}' "$id")"
    [ "$mount" = "${PROJECT}_propserve-data false" ] || { echo "replica $id: $mount"; return 1; }
  done
  echo "${PROJECT}_propserve-data: writer rw, $(containers replica | wc -l) replicas ro"
}

stop_pollers() {  # the pollers still running; a poller's pid file goes once it has ended
  local pidfile
  for pidfile in "$WORK"/poll-*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null
    rm -f "$pidfile"
  done
  return 0
}

follows() {  # follows VERSION: pollers in every replica, then the label moves; lag <= 2 s
  local version="$1" ids id i=0 n deadline lb_poller
  ids="$(containers replica)"
  [ -n "$ids" ] || { echo "no replica running"; return 1; }
  rm -f "$WORK"/poll-*
  for id in $ids; do
    i=$((i + 1))
    # A simple command, so that $! is docker's own pid (it ends by itself within 30 s).
    docker exec -i -e SMOKE_TOKEN="$ADMIN_TOKEN" "$id" python - poll "$version" \
      <<<"$INSIDE_PY" >"$WORK/poll-$i.out" 2>&1 &
    echo $! >"$WORK/poll-$i.pid"
  done
  client poll "$version" >"$WORK/poll-lb.out" 2>&1 &  # through the balancer; ends by itself
  lb_poller=$!
  deadline=$((SECONDS + 60))
  for n in $(seq 1 "$i") lb; do  # every poller has asked once before the label moves
    until grep -q polling "$WORK/poll-$n.out" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        echo "poller $n did not start"; cat "$WORK/poll-$n.out"; stop_pollers; return 1
      fi
      sleep 0.2
    done
  done
  client label "$version" || { stop_pollers; return 1; }
  for ((n = 1; n <= i; n++)); do
    if ! wait "$(cat "$WORK/poll-$n.pid")"; then
      rm -f "$WORK/poll-$n.pid"
      echo "replica $n:"; cat "$WORK/poll-$n.out"; stop_pollers; return 1
    fi
    rm -f "$WORK/poll-$n.pid"
  done
  wait "$lb_poller" || { echo "through the balancer:"; cat "$WORK/poll-lb.out"; return 1; }
  "$PYTHON" - "$WORK/labelled-at" "$LAG_LIMIT" "$version" "$i" "$WORK" <<'LAGS'
import json
import sys

labelled, limit = float(open(sys.argv[1]).read()), float(sys.argv[2])
version, replicas, work = sys.argv[3], int(sys.argv[4]), sys.argv[5]


def lag(name):
    with open(f"{work}/poll-{name}.out") as out:
        return max(0.0, json.loads(out.read().splitlines()[-1])["seen"] - labelled)


lags = [lag(n) for n in range(1, replicas + 1)]
through = lag("lb")
print("replicas " + ", ".join(f"{x:.2f}s" for x in lags) + f"; balancer {through:.2f}s")
assert max(lags) <= limit, f"a replica took {max(lags):.2f}s (limit {limit:.0f} s)"
assert through <= limit, f"the balancer took {through:.2f}s (limit {limit:.0f} s)"
print(f"every replica ({replicas}) serves version {version} by label after at most "
      f"{max(lags):.2f}s, the balancer 20 in a row after {through:.2f}s (limit {limit:.0f} s)")
LAGS
}

every_replica_serves() {  # every_replica_serves VERSION
  local id
  [ -n "$(containers replica)" ] || { echo "no replica running"; return 1; }
  for id in $(containers replica); do
    inside "$id" serves "$1" || return 1
  done
  echo "$(containers replica | wc -l) replicas serve version $1 by label and by default"
}

replicas_refuse() {
  local id
  id="$(containers replica | head -n 1)"
  [ -n "$id" ] || { echo "no replica running"; return 1; }
  inside "$id" refuses
}

predictions_of() {  # predictions_of ID: predictions that process has answered
  inside "$1" predictions
}

spread() {  # spread N: N predictions through the balancer reach every replica, not the writer
  local n="$1" id before after line="" writer
  declare -A before_of
  writer="$(containers writer)"
  if [ -z "$writer" ] || [ -z "$(containers replica)" ]; then echo "no writer or no replica"; return 1; fi
  for id in $writer $(containers replica); do
    before_of[$id]="$(predictions_of "$id")" || return 1
  done
  client burst "$n" || return 1
  for id in $(containers replica); do
    before="${before_of[$id]}"
    after="$(predictions_of "$id")" || return 1
    line="$line +$((after - before))"
    [ $((after - before)) -gt 0 ] || { echo "replica $id answered none:$line"; return 1; }
  done
  after="$(predictions_of "$writer")" || return 1
  [ "$after" = "${before_of[$writer]}" ] || { echo "the writer answered $((after - ${before_of[$writer]}))"; return 1; }
  echo "after $n predictions through the balancer, replicas answered$line, the writer none"
}

scale() {  # scale N: compose up with N replicas (nothing else recreated), all healthy
  compose up -d --no-recreate --scale "replica=$1" || return 1
  [ "$(containers replica | wc -l)" -eq "$1" ] || { echo "$(containers replica | wc -l) replicas running"; return 1; }
  wait_healthy
}

start_load() {
  rm -f "$WORK/stop-load" "$WORK/load-started" "$WORK/load.json"
  client load >"$WORK/load.log" 2>&1 &
  load_pid=$!
  local deadline=$((SECONDS + 30))
  until [ -e "$WORK/load-started" ]; do
    ((SECONDS < deadline)) || { cat "$WORK/load.log"; return 1; }
    sleep 0.2
  done
  sleep 2
  echo "load running (pid $load_pid)"
}

stop_load() {
  sleep 2
  touch "$WORK/stop-load"
  wait "$load_pid"
  local rc=$?
  load_pid=""
  cat "$WORK/load.log"
  [ "$rc" = 0 ] && [ -e "$WORK/load.json" ] && echo "load stopped"
}

load_result() {  # load_result VERSIONS...: the load's counts, and what nginx sent twice
  local retried
  # A request nginx sent to a second server logs both addresses in "upstream".
  retried="$(docker logs "$(containers lb)" 2>/dev/null | grep -c '"upstream":"[^"]*, ')"
  client load-result "$retried" "$@"
}

KILLED=""
KILLED_IP=""
kill_replica() {  # docker kill the first replica; the others stay
  KILLED="$(containers replica | head -n 1)"
  [ -n "$KILLED" ] || { echo "no replica running"; return 1; }
  KILLED_IP="$(ip_of "$KILLED")"
  docker kill "$KILLED" >/dev/null || return 1
  sleep 1
  [ "$(docker inspect -f '{{.State.Running}}' "$KILLED")" = false ] \
    || { echo "$KILLED is running again"; return 1; }
  echo "killed $(docker inspect -f '{{.Name}}' "$KILLED") ($KILLED_IP); replicas still running: $(containers replica | wc -l)"
}

revive_replica() {  # docker start it again, healthy, caught up with the newest version
  local ip
  [ -n "$KILLED" ] || { echo "no replica was killed"; return 1; }
  docker start "$KILLED" >/dev/null || return 1
  wait_healthy "$KILLED" || return 1
  inside "$KILLED" serves "$1" || return 1
  ip="$(ip_of "$KILLED")"
  if [ "$ip" = "$KILLED_IP" ]; then
    echo "revived with the same address $ip, serves version $1"
  else
    echo "revived with a new address $ip (was $KILLED_IP), serves version $1"
  fi
}

volume_gone() {
  ! docker volume ls -q | grep -qx "${PROJECT}_propserve-data" && echo "volume removed"
}

echo "compose: ${COMPOSE[*]} ${COMPOSE_VERSION}; project $PROJECT"
echo "images: BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim} NGINX_BASE_IMAGE=${NGINX_BASE_IMAGE:-nginx:1.27-bookworm}"
echo "balancer: REST 127.0.0.1:$REST_PORT, gRPC 127.0.0.1:$GRPC_PORT"

check "build the images" compose build || finish
started=1
check "up -d with 2 replicas" compose up -d --scale replica=2 || finish
check "all healthy (docker inspect)" wait_healthy || finish
check "one volume: writer rw, replicas ro" read_only_store
check "train through the balancer, save version 1" client train || finish
check "every replica serves stable=1 within 2 s" follows 1 || finish
check "predictions through the balancer, all protocols" client through-lb 1
check "a replica refuses training, naming the writer" replicas_refuse
check "scale up to 3 replicas, all healthy" scale 3 || finish
check "the new replica serves version 1" every_replica_serves 1
check "predictions reach all 3 replicas, not the writer" spread 90
check "prediction load through the balancer" start_load || finish
check "scale down to 2 under load" scale 2
check "kill a replica (docker kill)" kill_replica
check "train and save version 2 while it is down" client train-more
check "the others serve stable=2 within 2 s" follows 2
check "docker start it: healthy, catches up" revive_replica 2
check "predictions reach both replicas again" spread 60
check "stop the load" stop_load
check "load: 0 failed requests" load_result 1 2
check "down -v" compose down -v --remove-orphans && started=0
check "volume removed" volume_gone
finish
