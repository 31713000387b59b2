# CUDA PyTorch base; the project installed on top; `accelerate` is the entry point, so
#   docker run --gpus all --shm-size=16g -v /data:/data hipt-e2e launch recipes/e2e.py --config ...
# runs a recipe exactly as `accelerate launch` would on the host.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

WORKDIR /opt/hipt-e2e
COPY pyproject.toml README.md ./
COPY hipt_e2e ./hipt_e2e
COPY shards ./shards
COPY recipes ./recipes
RUN pip install --no-cache-dir -e . && rm -rf /root/.cache

ENTRYPOINT ["accelerate"]
CMD ["launch", "--help"]
