# megatron-fusion on an NGC PyTorch image (CUDA, NCCL, Transformer Engine and apex included).
#
#   docker build -t megatron-fusion:latest .
#   docker build --build-arg NGC_TAG=25.11 -t megatron-fusion:25.11 .
#   enroot import -o megatron-fusion.sqsh dockerd://megatron-fusion:latest   # for pyxis (CONTAINER_IMAGE)
#
# Pick a tag whose Transformer Engine is in megatron-core 0.16's range (TE >= 2.9, < 2.12) and
# whose torch is >= 2.7: NGC ships torch as a pre-release ("2.9.0a0+..."), which a plain
# "torch>=2.6" requirement would try to *replace* from PyPI. The image's own versions are frozen
# into a constraints file first, so pip never reinstalls torch, TE, apex or NCCL.
ARG NGC_TAG=25.11
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-fusion

# Everything the image already has stays at its version.
RUN pip list --format=freeze | grep -viE '^(megatron-core|megatron_core)==' > /tmp/image-constraints.txt

# Dependencies first (cached layer), then the package itself (editable: the repo can be mounted
# over /workspace/megatron-fusion on the cluster and the code used in place).
COPY setup.py ./
RUN mkdir -p megatron_fusion && touch megatron_fusion/__init__.py && \
    pip install --no-cache-dir -c /tmp/image-constraints.txt "megatron-core==0.16.1" -e ".[wandb,hf]"

COPY megatron_fusion/ megatron_fusion/
COPY configs/ configs/
COPY launch/ launch/
COPY tools/ tools/
RUN pip install --no-cache-dir --no-deps -c /tmp/image-constraints.txt -e . && \
    python -c "import torch, megatron.core, transformer_engine, megatron_fusion; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, \
'| transformer-engine', transformer_engine.__version__)" && \
    megatron-fusion plan --config configs/recipes/fuse_14b.yaml --nodes 4 --gpus-per-node 8 --teacher-nodes 2 > /dev/null

CMD ["bash"]
