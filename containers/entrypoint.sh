#!/bin/sh
# Entrypoint of the gpt2ops images. All of these work:
#   docker run IMAGE preprocess --help           -> gpt2ops preprocess --help
#   docker run IMAGE gpt2ops preprocess --help   -> the same
#   docker run IMAGE sh -c '...'                 -> any program on PATH runs as given; this is how
#                                                   Kubeflow's local DockerRunner starts components
# (on Kubernetes the pod's `command` replaces this entrypoint altogether).
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ] || ! command -v "$1" >/dev/null 2>&1; then
    set -- gpt2ops "$@"
fi
exec "$@"
