# streamssl on a CUDA machine with DALI. Build: docker build -t streamssl .
# CPU-only hosts can use the same image (DALI falls back to its CPU mode, torch to the CPU).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamssl ./streamssl
COPY pipelines ./pipelines
# torch/torchvision as the Makefile pins them; the dali extra brings nvidia-dali-cuda130
# (for drivers older than CUDA 13 replace it by nvidia-dali-cuda120).
RUN pip install torch==2.14.1 torchvision==0.29.1 \
 && pip install '.[dali]' torch==2.14.1 torchvision==0.29.1

RUN useradd --create-home streamssl && mkdir -p /data /runs && chown streamssl /data /runs
USER streamssl
VOLUME ["/runs"]
EXPOSE 9464
ENTRYPOINT ["streamssl"]
CMD ["run", "--config", "gpu-resnet50", "--set", "checkpoint.dir=/runs", "--set", "metrics.host=0.0.0.0"]
