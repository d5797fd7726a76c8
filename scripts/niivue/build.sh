#!/usr/bin/env bash
# Rebuilds the NiiVue bundle that m2m's report viewer ships (m2m_app/data/niivue/): a classic
# script (IIFE, global `niivue`), because a page opened from file:// in Chromium may not load ES
# modules, and NiiVue's npm package ships ES modules (and a UMD build with 1.4 MB of Zarr codecs
# the report never uses). Needs node and npm (development time only: nothing is fetched when a
# report is viewed). The versions are exact and locked (package.json, package-lock.json with each
# tarball's integrity), so the same inputs give the same bundle; niivue.json records its SHA-256,
# which tests/test_reports_viewer.py checks against the committed file.
#
#   scripts/niivue/build.sh        # about 10 s; then commit m2m_app/data/niivue/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$here/../.." && pwd)/m2m_app/data/niivue
bundle=niivue.min.js
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here"/package.json "$here"/package-lock.json "$here"/entry.js "$here"/numcodecs-stub "$work"/
cd "$work"
npm ci --no-audit --no-fund --loglevel=error
node_modules/.bin/esbuild entry.js --bundle --format=iife --global-name=niivue --minify --target=es2020 \
  --legal-comments=none --alias:numcodecs=./numcodecs-stub --metafile=meta.json --outfile=bundle.js --log-level=warning
mkdir -p "$out"
node "$here/notices.mjs" meta.json "$bundle" "$here/NIIVUE-LICENSE.txt" "$out"
# The licences travel inside the file too (a report's folder holds a copy of the bundle alone).
{ printf '/*! m2m build of NiiVue and the packages it bundles; their licences:\n\n'
  sed 's#\*/#* /#g' "$out/THIRD_PARTY_LICENSES.txt"
  printf '*/\n'
  cat bundle.js
} > "$out/$bundle"
sha=$(sha256sum "$out/$bundle" | cut -d' ' -f1)
node -e '
  const fs = require("fs"), [file, sha, bytes] = process.argv.slice(1);
  const record = JSON.parse(fs.readFileSync(file, "utf8"));
  fs.writeFileSync(file, JSON.stringify({ ...record, sha256: sha, bytes: Number(bytes) }, null, 2) + "\n");
' "$out/niivue.json" "$sha" "$(stat -c %s "$out/$bundle")"
echo "$out/$bundle: $(stat -c %s "$out/$bundle") bytes, sha256 $sha"
