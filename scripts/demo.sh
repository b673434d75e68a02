#!/usr/bin/env bash
# `make demo`: a Prefect server with its UI (started here when none answers), the example
# pipeline registered as a scheduled deployment, and one run of it through that server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PREFECT="$VENV/bin/prefect"
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:4200/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
UI=${PREFECT_API_URL%/api}
mkdir -p .algodock

if curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  echo "Prefect server answers at $UI"
else
  echo "starting a Prefect server with its UI at $UI (log: .algodock/prefect-server.log)"
  host=$(echo "$UI" | sed -E 's|https?://([^:/]+).*|\1|'); port=$(echo "$UI" | sed -E 's|.*:([0-9]+).*|\1|')
  # Its own SQLite file: no other Prefect process on this machine (a temporary server of an
  # `algodock run` without PREFECT_API_URL, a test harness) writes to it, so no "database is locked".
  PREFECT_SERVER_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$PWD/.algodock/prefect-demo.db" \
    setsid nohup "$PREFECT" server start --host "$host" --port "$port" > .algodock/prefect-server.log 2>&1 < /dev/null &
  echo $! > .algodock/prefect-server.pid
  for _ in $(seq 1 120); do
    curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "the Prefect server did not start; see .algodock/prefect-server.log" >&2; tail -20 .algodock/prefect-server.log >&2; exit 1; }
fi

# The scheduled deployment of prefect.yaml (a process work pool; `prefect worker start
# --pool algodock-local` runs its scheduled runs).
"$PREFECT" work-pool inspect algodock-local >/dev/null 2>&1 || "$PREFECT" work-pool create algodock-local --type process >/dev/null
ALGODOCK_HOME="$PWD" "$PREFECT" --no-prompt deploy --all >/dev/null 2>&1 && echo "deployment algodock-pipeline/device-visits-daily registered (daily at 03:00 UTC)" \
  || echo "note: could not register the deployment (see 'prefect deploy --all')" >&2

echo "running deployments/device-visits-daily.yaml ..."
set +e
"$VENV/bin/algodock" run deployments/device-visits-daily.yaml --json > .algodock/demo/run.json
rc=$?
echo "running examples/python_flow.py (the same algorithms composed in a Python flow) ..."
"$VENV/bin/python" - > .algodock/demo/python-flow.txt <<'PY'
import importlib.util
spec = importlib.util.spec_from_file_location("python_flow", "examples/python_flow.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
state = module.device_visits_python(pings=".algodock/demo/pings", store=".algodock/store", return_state=True)
print(state.state_details.flow_run_id, state.type.value)
PY
py_rc=$?
[ $rc -eq 0 ] && rc=$py_rc
set -e
"$VENV/bin/python" - <<'PY'
import json, os
from prefect.client.orchestration import get_client

s = json.load(open(".algodock/demo/run.json"))
ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
print(f"\nrun {s['run_id']}: {s['status']}")
for step in s["steps"]:
    outs = ", ".join(f"{o['name']} ({o['rows']} rows) {o['uri']}" for o in step.get("outputs") or [])
    print(f"  {step['id']:<8} {step['status']:<10} {(step.get('image_id') or '')[:19]}  {outs}")
deployment = None
try:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("algodock-pipeline/device-visits-daily")
except Exception:
    pass
print("\nStop the server with: kill $(cat .algodock/prefect-server.pid)")
if deployment is not None:
    print(f"The daily deployment (a worker runs it: prefect worker start --pool algodock-local): {ui}/deployments/deployment/{deployment.id}")
print(f"\nPrefect UI:  {ui}")
if s.get("flow_run_id"):
    print(f"This run:    {ui}/runs/flow-run/{s['flow_run_id']}   (graph: the steps and their edges; Artifacts: steps and outputs)")
print(f"Lineage:     .venv/bin/algodock lineage {s['run_id']}")
try:
    flow_run_id, outcome = open(".algodock/demo/python-flow.txt").read().split()[-2:]
    print(f"Python flow: {ui}/runs/flow-run/{flow_run_id}   ({outcome.lower()}; examples/python_flow.py: Python tasks and algorithm containers in one graph)")
except (OSError, ValueError):
    print("Python flow: did not run (see the output above)")
PY
exit $rc
