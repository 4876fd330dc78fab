#!/usr/bin/env bash
# Builds the real components of the end-to-end suite from the package registries (the Go
# module proxy through `go install`, Debian through apt-get): no prebuilt downloads.
# Outputs go to e2e/.bin/ (git-ignored, or $TAPER_TOOLS_DIR); each tool is skipped when
# the pinned version in e2e/versions.env is already built there.
#
#   e2e/scripts/build-tools.sh [minio|etcd|kube|helm|prometheus|monitoring-crds ...]   # default: all
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
source "$here/versions.env"
bin=${TAPER_TOOLS_DIR:-$here/.bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
# Go's module and build caches for these builds live in e2e/.cache/ (git-ignored) and are
# removed after a build, since e2e/.bin/ is the cache that matters: together they reach
# 7 GB for Kubernetes, MinIO and helm, which a CI disk may not have to spare beside
# cargo's target/. TAPER_KEEP_GO_CACHE=1 keeps them (faster rebuilds after a version bump).
export GOCACHE=${TAPER_GOCACHE:-$here/.cache/go-build} GOMODCACHE=${TAPER_GOMODCACHE:-$here/.cache/gomod}
# The build functions run in subshells (see the loop at the end): a file, not a variable,
# says that one of them used the Go caches.
built_marker=$(mktemp)
mark_built() { echo 1 >"$built_marker"; }
drop_go_caches() {
  if [ -s "$built_marker" ] && [ "${TAPER_KEEP_GO_CACHE:-0}" != 1 ]; then
    echo "removing Go caches ($(du -sh "$GOCACHE" "$GOMODCACHE" 2>/dev/null | awk '{print $1}' | paste -sd+)) (TAPER_KEEP_GO_CACHE=1 keeps them)"
    go clean -cache -modcache || true
  fi
  : >"$built_marker"
}
trap 'drop_go_caches; rm -f "$built_marker"' EXIT

stamp_ok() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$bin/.$1.version"; }

build_minio() {
  if stamp_ok minio "$MINIO_VERSION"; then echo "minio $MINIO_VERSION: cached"; return; fi
  echo "minio $MINIO_VERSION: building (several minutes on 2 cores)"; mark_built
  GOBIN="$bin" go install "github.com/minio/minio@$MINIO_VERSION"
  stamp minio "$MINIO_VERSION"
}

build_etcd() {
  if stamp_ok etcd "$ETCD_VERSION"; then echo "etcd $ETCD_VERSION: cached"; return; fi
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\$" "$here/tools/etcd/go.mod" || {
    echo "e2e/tools/etcd/go.mod does not require etcd $ETCD_VERSION: run (cd e2e/tools/etcd && go get go.etcd.io/etcd/server/v3@$ETCD_VERSION && go mod tidy)" >&2
    return 1
  }
  echo "etcd $ETCD_VERSION: building"; mark_built
  (cd "$here/tools/etcd" && go build -trimpath -o "$bin/etcd" .)
  stamp etcd "$ETCD_VERSION"
}

build_kube() {
  local v=$KUBE_VERSION staging=v0.${KUBE_VERSION#v1.}
  if stamp_ok kube-apiserver "$v" && stamp_ok kube-controller-manager "$v"; then echo "kubernetes $v: cached"; return; fi
  echo "kubernetes $v: generating the wrapper module"; mark_built
  local src=$bin/kube-src gomod
  mkdir -p "$src"
  gomod=$(go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module taper.dev/e2e/kube"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    echo "replace ("
    # k8s.io/kubernetes points each staging module at ./staging/src/...; point them at the
    # published module of the same release instead.
    grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/' "$gomod" \
      | awk -v sv="$staging" '{print "\t" $1 " => " $1 " " sv}'
    echo ")"
  } >"$src/go.mod"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1
    -X k8s.io/component-base/version.gitMinor=$(echo "$v" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean
    -X k8s.io/client-go/pkg/version.gitVersion=$v"
  for cmd in kube-apiserver kube-controller-manager; do
    echo "kubernetes $v: building $cmd (many minutes on 2 cores)"
    (cd "$src" && GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
    stamp "$cmd" "$v"
  done
}

build_helm() {
  if stamp_ok helm "$HELM_VERSION"; then echo "helm $HELM_VERSION: cached"; return; fi
  echo "helm $HELM_VERSION: building"; mark_built
  GOBIN="$bin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  stamp helm "$HELM_VERSION"
}

build_prometheus() {
  if stamp_ok prometheus "$PROMETHEUS_DEB_VERSION" && stamp_ok promtool "$PROMETHEUS_DEB_VERSION"; then
    echo "prometheus $PROMETHEUS_DEB_VERSION: cached"; return
  fi
  # Debian's package, fetched with apt-get and unpacked without installing it: no root, and
  # no service that a package script would start.
  echo "prometheus $PROMETHEUS_DEB_VERSION: fetching Debian's package"
  local dl; dl=$(mktemp -d)
  (cd "$dl" && apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  ls "$dl"/prometheus_*.deb >/dev/null 2>&1 || { echo "apt-get download prometheus=$PROMETHEUS_DEB_VERSION failed (is the Debian index current? try apt-get update)" >&2; return 1; }
  dpkg-deb -x "$dl"/prometheus_*.deb "$dl/root"
  for cmd in prometheus promtool; do
    install -m 0755 "$dl/root/usr/bin/$cmd" "$bin/$cmd"
    stamp "$cmd" "$PROMETHEUS_DEB_VERSION"
  done
  rm -rf "$dl"
}

# prometheus-operator's CustomResourceDefinitions for the chart's ServiceMonitor, PodMonitor
# and PrometheusRule, as prometheus-operator publishes them (example/prometheus-operator-crd
# in its Go module, fetched from the module proxy; nothing is built or run).
build_monitoring_crds() {
  local dir=$bin/monitoring-crds
  if [ "$(cat "$bin/.monitoring-crds.version" 2>/dev/null)" = "$PROMETHEUS_OPERATOR_VERSION" ] && [ -d "$dir" ]; then
    echo "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: cached"; return
  fi
  echo "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: fetching its module"; mark_built
  local src
  src=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$dir" && mkdir -p "$dir"
  for crd in servicemonitors podmonitors prometheusrules; do
    install -m 0644 "$src/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" "$dir/"
  done
  stamp monitoring-crds "$PROMETHEUS_OPERATOR_VERSION"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(minio etcd kube helm prometheus monitoring-crds)
# Each tool is built even when an earlier one failed (a test needing only MinIO should not
# fail because helm's build did), and a failed build is tried once more: the module proxy
# and Debian's mirror both have transient failures. The disk's state goes into the log,
# since a full disk is the usual cause on CI.
failed=()
for t in "${tools[@]}"; do
  case "$t" in
    minio | etcd | kube | helm | prometheus | monitoring-crds) ;;
    *) echo "unknown tool $t" >&2; exit 2 ;;
  esac
  fn=build_${t//-/_}
  # Not `if ! (...)`: errexit does not apply inside a condition, so a failed step would go
  # on to stamp the tool as built.
  set +e
  (set -e; "$fn"); rc=$?
  if [ "$rc" != 0 ]; then
    echo "$t: build failed; disk: $(df -h "$bin" | awk 'NR == 2 {print $4 " free of " $2}'); trying once more" >&2
    (set -e; "$fn"); rc=$?
    [ "$rc" = 0 ] || failed+=("$t")
  fi
  set -e
  # Drop the Go caches after each tool that used them: the disk's peak is then one tool's
  # caches, not all of them (Kubernetes' alone reach 3 GB).
  drop_go_caches
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED to build: ${failed[*]} (see the messages above)" >&2
  exit 1
fi
