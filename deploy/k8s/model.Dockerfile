# The model as an image: each tier's init container copies the files that tier loads from /model
# into the pod's model volume (deploy/k8s). Build context: the model folder.
#   docker build -f deploy/k8s/model.Dockerfile -t tierserve-model:default artifacts/default
# Its base (BASE) is the serving image as deploy/k8s/base names it, deploy/Dockerfile built as
# tierserve:0.1.0 (already on the node; it has `sh` and `cp` and runs as uid 10001).
ARG BASE=tierserve:0.1.0
FROM ${BASE}
COPY . /model/
