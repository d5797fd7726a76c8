#!/usr/bin/env bash
# Container smoke test: builds the m2m image with podman and runs the embedded example in it the
# ways users do: the README's line verbatim (docker meaning podman; as the caller), then as the
# image's own user with --read-only --tmpfs /tmp --network=none, as an arbitrary
# --user 1234:1234 without a passwd entry (as Docker and HPC sites run it), and with --read-only
# but no writable /tmp (m2m's one-line error, exit 73). The outputs are loaded with
# nibabel/trx-python on the host. Exits non-zero at the first failed check.
#
#   scripts/container_smoke.sh            (as root, or as a user podman works for)
#
# Environment (all optional):
#   M2M_IMAGE         image name (default m2m, so that the README's line runs verbatim)
#   BASE_IMAGE        base image; default python:3.11-slim if it can be pulled, else a Debian
#                     bookworm made here with debootstrap (kept as localhost/m2m-base:bookworm)
#   M2M_TORCH_WHEELS  folder with the torch wheel (default: a find-links folder of the host's
#                     pip holding one; none: the Dockerfile's TORCH_INDEX)
#   M2M_SMOKE_DIR     where data, outputs, logs and smoke.json go (default: a new temporary folder)
# Budget: under 10 minutes on 2 cores. So only the README's run computes everything (both
# networks, NeRF, streamlines); the other two stop after the tensor maps (--skip-phase2), which
# still runs phase 1, the map and sidecar writers and the report: what the engine options
# (--read-only, --user) can break; and --network=none shares the --read-only run. A cold build
# (no layer cache: every package downloaded and installed) takes minutes more.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${M2M_IMAGE:-m2m}
SMOKE=${M2M_SMOKE_DIR:-$(mktemp -d /tmp/m2m-smoke.XXXXXX)}
mkdir -p "$SMOKE"
log() { echo "container_smoke: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
seconds() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

# --- podman, configured as this kind of machine needs it --------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc) >"$SMOKE/apt.log" 2>&1 \
    || fail "could not install podman (see $SMOKE/apt.log)"
fi
# runc: crun refuses hybrid cgroup hierarchies; the default nofile/nproc limits are too low for
# pip and Nipype's workers. Given through CONTAINERS_CONF, so /etc/containers stays untouched.
if [ -z "${CONTAINERS_CONF:-}" ]; then
  cat >"$SMOKE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF="$SMOKE/containers.conf"
fi
podman info >/dev/null 2>"$SMOKE/podman-info.log" || fail "podman does not work here (see $SMOKE/podman-info.log)"

# --- the base image ---------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if timeout 60 podman pull -q docker.io/library/python:3.11-slim >"$SMOKE/pull.log" 2>&1; then
    BASE_IMAGE=docker.io/library/python:3.11-slim
  else
    BASE_IMAGE=localhost/m2m-base:bookworm
    if ! podman image exists "$BASE_IMAGE"; then
      log "no base image can be pulled: making $BASE_IMAGE with debootstrap"
      command -v debootstrap >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap) \
        >>"$SMOKE/apt.log" 2>&1 || fail "could not install debootstrap"
      rootfs="$SMOKE/rootfs"
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >"$SMOKE/debootstrap.log" 2>&1 || fail "debootstrap (see $SMOKE/debootstrap.log)"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
      rm -rf "$rootfs"
    fi
  fi
fi
log "base image: $BASE_IMAGE"

# --- build ------------------------------------------------------------------------------------
# pip in the build stage gets the host's pip configuration (indexes, find-links, constraints, the
# CA bundle of a proxy that re-signs HTTPS): merged into one pip.conf, with every local path it
# names mounted read-only at the same place. Mounts are not part of any layer.
# (A local index .../simple links to files beside it: its parent is mounted.)
declare -A seen_key=() seen_path=()
build_mounts=()
pip_conf="$SMOKE/pip.conf"
echo "[global]" >"$pip_conf"
while IFS= read -r line; do  # `pip config list`: environment first, then the files, as pip ranks them
  key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  [ -n "${seen_key[$key]:-}" ] && continue
  seen_key[$key]=1
  echo "$key = $value" >>"$pip_conf"
  for word in $value; do
    path=${word#file://}
    [ "${path##*/}" = simple ] && path=${path%/simple}
    if [ "${path:0:1}" = / ] && [ -e "$path" ] && [ -z "${seen_path[$path]:-}" ]; then
      seen_path[$path]=1
      build_mounts+=(-v "$path:$path:ro")
    fi
  done
done < <(python3 -m pip config list 2>/dev/null || true)
build_mounts+=(-v "$pip_conf:/etc/pip.conf:ro")
wheels=${M2M_TORCH_WHEELS:-}
if [ -z "$wheels" ]; then
  for folder in $(sed -n 's/^find-links = //p' "$pip_conf"); do
    if compgen -G "$folder/torch-*.whl" >/dev/null; then wheels=$folder; break; fi
  done
fi
torch_args=()
if [ -n "$wheels" ]; then
  build_mounts+=(-v "$(realpath "$wheels"):/wheels:ro")
  torch_args=(--build-arg TORCH_WHEELS=/wheels)
  log "torch from $wheels: $(cd "$wheels" && ls torch-*.whl | tr '\n' ' ')"
fi
log "building $IMAGE (log: $SMOKE/build.log)"
t0=$(seconds)
podman build --layers -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" "${torch_args[@]}" "${build_mounts[@]}" . \
  >"$SMOKE/build.log" 2>&1 || { tail -30 "$SMOKE/build.log" >&2; fail "podman build"; }
build_s=$(since "$t0")
size_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built in ${build_s} s; image size $((size_bytes / 1000000)) MB"

# --- the image itself -------------------------------------------------------------------------
version=$(podman run --rm "$IMAGE" --version) || fail "--version"
[[ $version == "m2m, version "* ]] || fail "--version printed '$version'"
podman run --rm --entrypoint sh "$IMAGE" -c 'test ! -e /src && test "$(id -u)" != 0' || fail "source folder left or running as root"
if [ -n "$wheels" ] && ls "$wheels"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  podman run --rm --entrypoint python "$IMAGE" -c "import torch; assert torch.version.cuda is None, torch.__version__" \
    || fail "the image holds a CUDA build of torch although the CPU wheel was given"
fi

# --- the embedded example, run as users run it ------------------------------------------------
# Host folders writable by any container user (the image's m2m user, --user 1234:1234).
install -d -m 1777 "$SMOKE/readme" "$SMOKE/out-readonly" "$SMOKE/out-user" "$SMOKE/out-notmp"
podman run --rm -v "$SMOKE/readme:/data" "$IMAGE" example-data /data/bids >"$SMOKE/example-data.log" 2>&1 \
  || fail "m2m example-data in the container (see $SMOKE/example-data.log)"
run_m2m() {  # NAME OUT_FOLDER [podman options...] -- [m2m options...]
  local name=$1 out=$2; shift 2
  local engine_opts=() app_opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do engine_opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  app_opts=("$@")
  local start; start=$(seconds)
  podman run --rm "${engine_opts[@]}" -v "$SMOKE/readme/bids:/data:ro" -v "$out:/out" \
    "$IMAGE" /data /out participant "${app_opts[@]}" >"$SMOKE/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(since "$start")" >>"$SMOKE/runs.txt"
  return $rc
}
: >"$SMOKE/runs.txt"
# The README's line verbatim, with docker meaning podman: the whole pipeline, default work folder.
readme_line=$(grep -o -m1 'mkdir -p out && docker run [^`]*' README.md) || fail "README.md has no docker run line"
start=$(seconds)
(cd "$SMOKE/readme" && docker() { podman "$@"; } && eval "$readme_line") >"$SMOKE/readme.log" 2>&1 \
  || { tail -20 "$SMOKE/readme.log" >&2; fail "the README's line: $readme_line"; }
echo "readme 0 $(since "$start")" >>"$SMOKE/runs.txt"
# The image's own user from here on.
# --read-only-tmpfs=false: only the /tmp asked for, as with Docker's --read-only.
run_m2m readonly "$SMOKE/out-readonly" --read-only --read-only-tmpfs=false --tmpfs /tmp --network=none -- --skip-phase2 \
  || { tail -20 "$SMOKE/readonly.log" >&2; fail "--read-only --tmpfs /tmp --network=none"; }
# --passwd=false: no /etc/passwd entry for the UID, as with Docker or Apptainer on a cluster.
run_m2m user "$SMOKE/out-user" --user 1234:1234 --passwd=false -- --skip-phase2 \
  || { tail -20 "$SMOKE/user.log" >&2; fail "--user 1234:1234"; }
# --read-only without any writable /tmp: the work folder cannot be made; one line, exit 73.
rc=0; run_m2m notmp "$SMOKE/out-notmp" --read-only --read-only-tmpfs=false || rc=$?
[ "$rc" = 73 ] || { cat "$SMOKE/notmp.log" >&2; fail "--read-only without /tmp exited $rc, not 73"; }
grep -q Traceback "$SMOKE/notmp.log" && { cat "$SMOKE/notmp.log" >&2; fail "--read-only without /tmp: a traceback"; }
grep -q "^m2m: error: cannot create the work folder /tmp/m2m_work" "$SMOKE/notmp.log" \
  || { cat "$SMOKE/notmp.log" >&2; fail "--read-only without /tmp: not m2m's one-line error"; }

# --- the outputs load, on the host ------------------------------------------------------------
python=python3
if ! python3 -c "import nibabel, trx" 2>/dev/null; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import nibabel, trx" 2>/dev/null; then python=.venv/bin/python
  else
    python3 -m venv "$SMOKE/venv" && "$SMOKE/venv/bin/pip" install -q nibabel trx-python >"$SMOKE/venv.log" 2>&1 \
      || fail "could not install nibabel on the host (see $SMOKE/venv.log)"
    python=$SMOKE/venv/bin/python
  fi
fi
"$python" - "$SMOKE" "$version" "$size_bytes" "$build_s" "$BASE_IMAGE" <<'EOF' || fail "outputs"
import json, sys
from pathlib import Path

import nibabel as nib
import numpy as np
from trx.trx_file_memmap import load as load_trx

smoke, version, size, build_s, base = Path(sys.argv[1]), sys.argv[2].split()[-1], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
runs = {name: float(s) for name, rc, s in (line.split() for line in (smoke / "runs.txt").read_text().splitlines())}
for run in ("readme", "readonly", "user"):
    out = smoke / "readme" / "out" if run == "readme" else smoke / f"out-{run}"
    maps = sorted(out.glob("sub-*/dwi/*.nii.gz"))
    assert any("param-fa" in p.name for p in maps), (run, maps)
    assert run != "readme" or any("tdi" in p.name for p in maps), maps
    for path in maps:
        data = np.asarray(nib.load(path).dataobj)
        assert np.isfinite(data).all() and np.any(data), f"{path}: not finite or all zero"
    assert (out / "sub-MNI152.html").stat().st_size > 0, run
    container = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0].get("Container")
    assert container == {"Type": "Podman", "Tag": f"m2m:{version}"}, (run, container)
owners = {p.stat().st_uid for p in (smoke / "out-user").rglob("*")}
assert owners == {1234}, f"--user 1234:1234 wrote files owned by {owners}"
trx_files = list((smoke / "readme" / "out").glob("sub-*/dwi/*_tractogram.trx"))
assert len(trx_files) == 1, trx_files
streamlines = len(load_trx(str(trx_files[0])).streamlines)
assert streamlines > 1000, f"{trx_files[0]}: {streamlines} streamlines"
summary = {"version": version, "base_image": base, "image_size_bytes": size, "build_seconds": round(build_s, 1),
           "run_seconds": {k: round(v, 1) for k, v in runs.items()}, "streamlines": streamlines}
(smoke / "smoke.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
if [ -n "${M2M_SMOKE_DIR:-}" ]; then
  log "passed (details in $SMOKE)"
else
  rm -rf "$SMOKE" 2>/dev/null || log "could not remove $SMOKE"
  log "passed"
fi
