# streamssl: one image for GPU and CPU hosts. Build: docker build -t streamssl .
#
# The base is a plain Python image, not a CUDA one: the torch and DALI wheels bring the CUDA libraries they
# were built with (runtime, cuBLAS, cuDNN, NCCL, nvJPEG through nvImageCodec) as pip packages, so a CUDA base
# image would only add a second, unused copy (~3 GB). The driver (libcuda) comes from the host through the
# NVIDIA Container Toolkit: `docker run --gpus all ...`. On a host without a GPU the same image runs on the
# CPU (DALI in its CPU mode).
#
# Driver and wheels go together. The defaults (torch 2.14.1 from the package index, nvidia-dali-cuda130) are
# CUDA 13 builds and need a driver of the 580 series or newer (`nvidia-smi` shows "CUDA Version: 13.x").
# On a CUDA 12 host (drivers 525-575) build all three for CUDA 12 instead:
#   docker build -t streamssl \
#     --build-arg TORCH_INDEX_URL=<the CUDA 12 wheel index (cu126, cu128) PyTorch's install page gives> \
#     --build-arg DALI_PACKAGE=nvidia-dali-cuda120 .
# (DALI's CUDA 12 build runs on any 12.x driver from 525.60; pick the torch build the driver supports.)
#
# Run as the user who owns the host's run folder, so checkpoints, history and reports stay theirs:
#   mkdir -p runs && docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" -p 9464:9464 streamssl
# The image works under any uid: nothing it needs is in a home directory (HOME is /tmp), and /runs is
# writable by everyone when no host folder is mounted over it (a named volume inherits that mode).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=""
ARG DALI_PACKAGE=nvidia-dali-cuda130

# video: without it the container gets no NVDEC/NVJPG engines, and DALI's hardware JPEG decoder (A100,
# H100, H200) falls back to CUDA kernels. compute and utility: CUDA and nvidia-smi.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, on its own layer: it is most of the image and changes least.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamssl ./streamssl
COPY pipelines ./pipelines
# The dali extra names the CUDA 13 build; DALI_PACKAGE picks the build that matches the torch above.
RUN pip install . "${DALI_PACKAGE}" torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} \
 && python -c "import streamssl, torch; print('streamssl', streamssl.__version__, 'torch', torch.__version__)"

RUN useradd --create-home --uid 10001 streamssl \
 && mkdir -p /data /runs && chmod 1777 /data /runs
USER 10001
VOLUME ["/runs"]
EXPOSE 9464
ENTRYPOINT ["streamssl"]
CMD ["run", "--config", "gpu-resnet50", "--set", "checkpoint.dir=/runs", "--set", "metrics.host=0.0.0.0"]
