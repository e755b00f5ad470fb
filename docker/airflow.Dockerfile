# syntax=docker/dockerfile:1.7
# Airflow image for the pipeline DAGs (api-server, scheduler, dag-processor, celery worker).
# The official image ships Airflow 3.3.2 with the Celery and PostgreSQL providers; the
# project's own dependencies are added at the versions of requirements.lock.
# Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t adfilter-airflow .
FROM apache/airflow:3.3.2-python3.11

USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 git \
 && rm -rf /var/lib/apt/lists/*
USER airflow

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MPLBACKEND=Agg \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/adfilter/dags

COPY --chown=airflow:0 requirements.lock /opt/adfilter/requirements.lock
RUN pip install --no-cache-dir -r /opt/adfilter/requirements.lock

# Tasks run the same pipeline functions as `dvc repro`, from this checkout.
COPY --chown=airflow:0 pyproject.toml README.md params.yaml dvc.yaml /opt/adfilter/
COPY --chown=airflow:0 adfilter /opt/adfilter/adfilter
COPY --chown=airflow:0 models /opt/adfilter/models
COPY --chown=airflow:0 tasks /opt/adfilter/tasks
COPY --chown=airflow:0 serving /opt/adfilter/serving
COPY --chown=airflow:0 dags /opt/adfilter/dags
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /opt/adfilter
WORKDIR /opt/adfilter
