# The vis4mer image: Ray 2.60 with a CUDA build of torch and this project, for KubeRay
# (deploy/kuberay/, `vis4mer k8s render --image ...`) or any GPU node.
#
#   docker build -t registry.example.com/vis4mer:0.1.0 .
#   docker push registry.example.com/vis4mer:0.1.0
#
# Build args: TORCH_VERSION (pyproject.toml admits torch>=2.4; 2.13.0 is the version tested with
# constraints.txt) and TORCH_CUDA, the CUDA build on PyTorch's wheel index (cu128 needs an NVIDIA
# driver >= 570 on the nodes; pick the build your driver supports).
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The base image runs as user `ray`; make the project folder as that user so pip can build in it.
RUN mkdir -p /home/ray/vis4mer
WORKDIR /home/ray/vis4mer

# torch first, from PyTorch's CUDA index (its layer is cached while the project changes)
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# The project (see .dockerignore: no .git, virtualenvs, data, MLflow stores, runs or checkpoints),
# installed in place (editable) as vis4mer.model, vis4mer.datasets and vis4mer.orchestrator: the
# code stays beside sweeps/ and deploy/, where the RayJob's entrypoint and `vis4mer demo` find them.
# Ray is the base image's 2.60.0, which constraints.txt also pins; torch stays the CUDA build above.
COPY --chown=ray:users . .
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install -e . -c /tmp/constraints.txt \
 && rm -rf build /tmp/constraints.txt \
 && vis4mer models

# KubeRay replaces the command with `ray start ...`; this is for `docker run IMAGE` on one machine.
CMD ["vis4mer", "--help"]
