# syntax=docker/dockerfile:1.7
# MLflow tracking server + model registry: PostgreSQL backend, artifacts in MinIO (S3 API),
# served through the tracking server (--serve-artifacts) so clients need no S3 credentials.
#   docker build -f docker/mlflow.Dockerfile -t adfilter-mlflow .
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY requirements.lock /tmp/requirements.lock
RUN pip install -c /tmp/requirements.lock mlflow psycopg2-binary boto3 \
 && useradd --uid 10001 --create-home mlflow
USER mlflow
EXPOSE 5000
