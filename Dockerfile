# Kubeforge's two images, one target each, built from the repository root (`make images` builds both):
#   docker build --target operator -t registry.example.com/kubeforge/operator:0.1.0 .
#   docker build --target runtime  -t registry.example.com/kubeforge/runtime:0.1.0 .
# operator: `kubeforge-operator` (the chart's Deployment) and `kubeforge-registry` (the chart's
#   registry.enabled, which uses this image unless registry.image names another).
# runtime: `kubeforge-train` and `kubeforge-serve`, the image of training and serving pods (the chart's
#   config.runtimeImage, or a TrainingJob's or InferenceService's spec.image). PyPI's torch for Linux x86-64
#   carries CUDA (the node's NVIDIA driver comes in through the device plugin); torch.compile needs a C++
#   compiler at run time (Inductor's kernels, Triton's launchers), hence g++. For AMD, Ascend or Cambricon
#   accelerators, build FROM the vendor's PyTorch image instead and keep the pip line (kubeforge-serve detects
#   the backend the image's torch supports; docs/serving.md).
# Not built by CI: its machines run no container engine; tests/unit/test_images.py checks this file against
# the repository.
FROM python:3.11-slim-bookworm AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds crds
COPY controllers controllers
COPY model_registry model_registry
COPY runtime runtime

FROM source AS build-operator
RUN pip install --no-cache-dir --prefix=/install ".[operator,registry]"

FROM source AS build-runtime
RUN pip install --no-cache-dir --prefix=/install ".[training,serving]"

FROM python:3.11-slim-bookworm AS operator
COPY --from=build-operator /install /usr/local
# a fixed non-root user, as the chart's securityContext expects (runAsNonRoot)
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["kubeforge-operator"]

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-runtime /install /usr/local
USER 65532:65532
WORKDIR /tmp
# the pods name their command (kubeforge-train or kubeforge-serve); this is for `docker run IMAGE --help`
ENTRYPOINT ["kubeforge-serve"]
