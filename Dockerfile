# The image of cg_tf's runs beyond one machine: the tasks of a Kubeflow / Vertex AI
# pipeline package (--kfp_image), Dataflow's workers (--sdk_container_image), and
# training on a cloud VM. Built on Beam's SDK image, so Dataflow can start its workers
# from it (its entry point is Beam's); a pipeline task sets its own command.
#
#   docker build -t cg_tf .                                                  # CPU
#   docker build --build-arg TENSORFLOW="tensorflow[and-cuda]==2.21.*" -t cg_tf:gpu .
#   docker build --build-arg TENSORFLOW="tensorflow-tpu==2.21.*" \
#       --build-arg PIP_EXTRA="-f https://storage.googleapis.com/libtpu-releases/index.html" \
#       -t cg_tf:tpu .
ARG BASE=apache/beam_python3.11_sdk:2.77.0
FROM ${BASE}

# tensorflow-cpu as setup.py pins it, or another build of the same version.
ARG TENSORFLOW="tensorflow-cpu==2.21.*"
ARG PIP_EXTRA=""

# The checkout the tasks run in (--kfp_workdir): the package, the programs, the configs.
WORKDIR /opt/cg_tf
COPY setup.py README.md ./
COPY cg_tf cg_tf
COPY pipelines pipelines
COPY tools tools
COPY configs configs

RUN pip install --no-cache-dir ".[gcp,kfp]" && \
    case "$TENSORFLOW" in tensorflow-cpu==*) ;; \
      *) pip uninstall -y tensorflow-cpu && pip install --no-cache-dir $PIP_EXTRA "$TENSORFLOW" ;; \
    esac
