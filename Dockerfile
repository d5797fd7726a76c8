# m2m BIDS-App container: docker run --rm -v /data:/data:ro -v /out:/out m2m /data /out participant
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    HOME=/home/m2m MPLCONFIGDIR=/tmp/matplotlib TORCH_HOME=/tmp/torch \
    NIPYPE_NO_ET=1 NO_ET=1 M2M_CONTAINER=docker \
    OMP_NUM_THREADS=1

RUN useradd --create-home --uid 1000 m2m
WORKDIR /src
COPY pyproject.toml README.md ./
COPY m2m_app ./m2m_app
# torch==2.13.0 is pinned in pyproject.toml; the CPU wheel keeps the image small. For GPUs,
# build with --build-arg TORCH_INDEX=<a CUDA wheel index> and run with --gpus all.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "$TORCH_INDEX" . && rm -rf /src \
    && python -c "import m2m_app.inference.predict as p; p.load_translator('phase1'); p.load_translator('phase2')"

# --read-only friendly: everything m2m writes goes to the mounted output/work folders or /tmp.
USER m2m
WORKDIR /home/m2m
ENTRYPOINT ["m2m"]
CMD ["--help"]
