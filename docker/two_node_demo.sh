#!/bin/sh
# Thin wrapper: the namespace two-node demo (needs root). Arguments go to two_node_demo.py,
# e.g.  sudo docker/two_node_demo.sh --keep-running -- --dtype float32
exec "${PYTHON:-python3}" "$(dirname "$0")/two_node_demo.py" "$@"
