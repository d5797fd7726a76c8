# m2m BIDS-App image.
#   docker build -t m2m .      (or: podman build -t m2m .)
#   docker run --rm -v /data:/data:ro -v /out:/out m2m /data /out participant
# Build arguments:
#   BASE_IMAGE    an image with Python >= 3.10 as `python3` and its venv module. Default
#                 python:3.11-slim; scripts/container_smoke.sh makes a Debian bookworm one with
#                 debootstrap where no image can be pulled.
#   TORCH_WHEELS  a folder holding the torch wheel: inside the build context (`wheels`), or
#                 mounted (`podman build -v DIR:/wheels:ro --build-arg TORCH_WHEELS=/wheels`).
#                 When set, torch comes from it alone and no torch index is asked.
#   TORCH_INDEX   otherwise, the only index torch is taken from: PyTorch's CPU wheels by default,
#                 a CUDA one (e.g. https://download.pytorch.org/whl/cu126) for GPUs (--gpus all).
# The source stays in the build stage: the image holds the installed virtual environment only.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# The dependencies, in a layer of their own (reused until pyproject.toml changes). torch first and
# from its own source only, so that a missing or unreachable source fails here instead of PyPI's
# CUDA build coming in with the other packages.
RUN python3 -m venv /opt/m2m \
 && /opt/m2m/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >requirements.txt \
 && torch=$(grep -E '^torch *==' requirements.txt) \
 && if [ -n "$TORCH_WHEELS" ]; then \
      /opt/m2m/bin/pip install --no-index --no-deps --find-links "$TORCH_WHEELS" "$torch" \
      && /opt/m2m/bin/pip install --find-links "$TORCH_WHEELS" -r requirements.txt ; \
    else \
      /opt/m2m/bin/pip install --index-url "$TORCH_INDEX" "$torch" && /opt/m2m/bin/pip install -r requirements.txt ; \
    fi
COPY . .
RUN /opt/m2m/bin/pip install --no-deps . && /opt/m2m/bin/pip check \
 && cd / && /opt/m2m/bin/python -c "import torch, m2m_app.inference.predict as p; print('torch', torch.__version__, 'CUDA', torch.version.cuda); p.load_translator('phase1'); p.load_translator('phase2')"

FROM ${BASE_IMAGE}
# HOME may be read-only (--read-only, --user UID:GID without a home): nothing m2m runs writes
# there. Everything written goes to the output and work folders, and caches to /tmp, which
# --read-only needs as a tmpfs (podman mounts one by default). M2M_CONTAINER names the image
# in dataset_description.json; M2M_WORK_DIR is the default of -w.
ENV PATH=/opt/m2m/bin:$PATH \
    HOME=/home/m2m MPLCONFIGDIR=/tmp/matplotlib TORCH_HOME=/tmp/torch M2M_WORK_DIR=/tmp/m2m_work \
    PYTHONDONTWRITEBYTECODE=1 NIPYPE_NO_ET=1 NO_ET=1 M2M_CONTAINER=m2m OMP_NUM_THREADS=1
COPY --from=build /opt/m2m /opt/m2m
# matplotlib's font cache, built once here into MPLCONFIGDIR, which every user may write (any
# --user finds the cache); a tmpfs on /tmp hides it, and then matplotlib rebuilds it once per run.
RUN useradd --create-home --uid 1000 m2m \
 && install -d -m 1777 "$MPLCONFIGDIR" \
 && python -c "import matplotlib.font_manager as f; print(len(f.fontManager.ttflist), 'fonts cached')" \
 && chmod -R a+rwX "$MPLCONFIGDIR"
USER m2m
WORKDIR /tmp
ENTRYPOINT ["m2m"]
CMD ["--help"]
