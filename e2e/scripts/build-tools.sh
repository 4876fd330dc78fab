#!/usr/bin/env bash
# Builds the real components of the end-to-end suite from the package registries (the Go
# module proxy through `go install`, Debian through apt-get): no prebuilt downloads.
# Outputs go to e2e/.bin/ (git-ignored, or $TAPER_TOOLS_DIR); each tool is skipped when
# the pinned version in e2e/versions.env is already built there.
#
#   e2e/scripts/build-tools.sh [minio|etcd ...]   # default: the tools the tests use (minio)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
source "$here/versions.env"
bin=${TAPER_TOOLS_DIR:-$here/.bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

stamp_ok() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$bin/.$1.version"; }

build_minio() {
  if stamp_ok minio "$MINIO_VERSION"; then echo "minio $MINIO_VERSION: cached"; return; fi
  echo "minio $MINIO_VERSION: building (several minutes on 2 cores)"
  GOBIN="$bin" go install "github.com/minio/minio@$MINIO_VERSION"
  stamp minio "$MINIO_VERSION"
}

build_etcd() {
  if stamp_ok etcd "$ETCD_VERSION"; then echo "etcd $ETCD_VERSION: cached"; return; fi
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\$" "$here/tools/etcd/go.mod" || {
    echo "e2e/tools/etcd/go.mod does not require etcd $ETCD_VERSION: run (cd e2e/tools/etcd && go get go.etcd.io/etcd/server/v3@$ETCD_VERSION && go mod tidy)" >&2
    return 1
  }
  echo "etcd $ETCD_VERSION: building"
  (cd "$here/tools/etcd" && go build -trimpath -o "$bin/etcd" .)
  stamp etcd "$ETCD_VERSION"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(minio)
for t in "${tools[@]}"; do
  case "$t" in
    minio) build_minio ;;
    etcd) build_etcd ;;
    *) echo "unknown tool $t" >&2; exit 2 ;;
  esac
done
