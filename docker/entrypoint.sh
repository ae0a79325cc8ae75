#!/bin/sh
# One entry point for every pomona container role (see docker/compose.yaml):
#   prefect-server  Prefect API + UI on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL)
#   mlflow-server   MLflow tracking server on PostgreSQL (MLFLOW_BACKEND_STORE_URI) with an artifact volume
#   worker          registers pomona's deployments (`<flow>/$POMONA_WORK_POOL`) on the pool $POMONA_WORK_POOL,
#                   then runs a Prefect process worker on it; runs start in $POMONA_WORKING_DIR (default: this
#                   folder, the image's /app), not in the worker's temporary folder, so recipe paths resolve
#   serve           `pomona serve`: deployments served from this container (no work pool)
#   anything else   run as a command (`pomona run configs/recipes/demo.yaml`, `bash`, ...)
# POMONA_ENTRYPOINT_DRY_RUN=1 prints the commands instead of running them (the tests check they resolve).
set -eu

run() {
    if [ -n "${POMONA_ENTRYPOINT_DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi
}

run_exec() {
    if [ -n "${POMONA_ENTRYPOINT_DRY_RUN:-}" ]; then echo "$*"; exit 0; fi
    exec "$@"
}

role="${1:-worker}"
[ "$#" -gt 0 ] && shift

case "$role" in
    prefect-server)
        run_exec prefect server start --host 0.0.0.0 --port "${PREFECT_SERVER_PORT:-4200}" "$@"
        ;;
    mlflow-server)
        run_exec mlflow server --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-1}" \
            --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}" \
            --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
            --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost:*,127.0.0.1:*}" "$@"
        ;;
    worker)
        pool="${POMONA_WORK_POOL:-pomona}"
        # Deployments are idempotent: re-registering on every start keeps them in step with the image's code.
        run pomona deploy --work-pool "$pool" --name "${POMONA_DEPLOYMENT_NAME:-$pool}" \
            --working-dir "${POMONA_WORKING_DIR:-$PWD}"
        # --with-healthcheck: /health on $PREFECT_WORKER_WEBSERVER_PORT (8080) for compose's healthcheck
        run_exec prefect worker start --pool "$pool" --type process --with-healthcheck "$@"
        ;;
    serve)
        run_exec pomona serve "$@"
        ;;
    *)
        run_exec "$role" "$@"
        ;;
esac
