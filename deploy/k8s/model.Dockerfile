# The model as an image: each tier's init container copies the files that tier loads from /model
# into the pod's model volume (deploy/k8s). Build context: the model folder.
#   docker build -f deploy/k8s/model.Dockerfile -t tierserve-model:default artifacts/default
# Its base is the serving image (already on the node; it has `cp` and runs as uid 10001).
ARG BASE=tierserve:latest
FROM ${BASE}
COPY . /model/
