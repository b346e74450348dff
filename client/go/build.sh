#!/bin/sh
# Build the Go client (the classify library and command) into OUT_DIR/classify from Debian's packages alone:
# GOPATH mode over /usr/share/gocode (golang-google-grpc-dev, golang-google-protobuf-dev), no module proxy. The
# classifier.v1 stubs are generated here by the protoc plugins of the same packages, so they always match both the
# installed grpc-go and the proto of this checkout. Needs: golang-go protobuf-compiler protoc-gen-go
# protoc-gen-go-grpc golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev.
#   client/go/build.sh OUT_DIR
# GOCODE names another Go source tree in place of /usr/share/gocode (another Debian release's packages, unpacked).
set -eu
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
gocode=${GOCODE:-/usr/share/gocode}
if [ -e "$gocode/src/github.com/golang/protobuf/proto/table_marshal.go" ]; then
  # grpc-go 1.33 marshals through github.com/golang/protobuf; its 1.3 version cannot marshal the APIv2 stubs that
  # protoc-gen-go makes (a nil-pointer panic in makeOneOfMarshaler on the first call), its 1.5 version can.
  echo "build.sh: golang-github-golang-protobuf-1-3-dev is installed; install golang-github-golang-protobuf-1-5-dev" >&2
  exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=classifyd.example/client/go
src="$work/src/$pkg"
mkdir -p "$src/gen"
cp -R "$here/classify" "$here/cmd" "$src/"
mapping=Mclassifier/v1/classifier.proto=$pkg/gen/classifier/v1
protoc -I "$repo/protos" \
  --go_out="$src/gen" --go_opt=paths=source_relative --go_opt="$mapping" \
  --go-grpc_out="$src/gen" --go-grpc_opt=paths=source_relative --go-grpc_opt="$mapping" \
  classifier/v1/classifier.proto
cd "$src"
# GOPATH mode: this tree, then Debian's Go source tree. GOFLAGS is cleared because a -mod=... from the caller's
# environment is an error in GOPATH mode; the build cache is Go's usual one (a temporary one without a HOME).
export GO111MODULE=off GOFLAGS= GOPATH="$work:$gocode"
[ -n "${GOCACHE:-}" ] || [ -n "${HOME:-}" ] || export GOCACHE="$work/cache"
go vet ./classify ./cmd/classify
go build -o "$out/classify" ./cmd/classify
