#!/bin/sh
# Helm post-renderer: Helm's manifests on stdin, the patched ones on stdout.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cat >"$here/cloud-api-adaptor.yaml"
exec kubectl kustomize "$here"
