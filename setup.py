"""Installs the cg_tf package and its programs (pipelines, tools); Dataflow workers
get it through --setup_file."""

import setuptools

# The stack that is tested together. On a GPU machine replace tensorflow-cpu
# with tensorflow[and-cuda]; on a Cloud TPU VM with tensorflow-tpu (README).
INSTALL_REQUIRES = [
    "tensorflow-cpu==2.21.*",
    "keras==3.15.*",
    "tensorboard==2.21.*",
    "apache-beam[tfrecord]==2.77.*",
    "tensorflow-datasets==4.9.10",
    "absl-py>=2.1",
    "scikit-learn>=1.5",
    "pillow>=10",
    "matplotlib>=3.8",
]

# What installs: the package and the programs' packages (the README's commands).
PACKAGES = ["cg_tf", "cg_tf.*", "pipelines", "tools"]

setuptools.setup(
    name="cg_tf",
    version="0.1.0",
    description="Coherent Gradients: memorization and generalization with robust "
    "gradient aggregation, in Keras 3 / TensorFlow.",
    python_requires=">=3.10",
    # The library and, beside it, the programs: `python -m pipelines.sweep`,
    # `python -m tools.plot`, ... run from any directory once installed.
    packages=setuptools.find_packages(include=PACKAGES),
    package_data={"cg_tf.tensorboard_plugin": ["static/*"]},
    # `tensorboard --logdir DIR` finds the Memorization tab through this entry point.
    entry_points={"tensorboard_plugins": [
        "memorization = cg_tf.tensorboard_plugin.plugin:MemorizationPlugin"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The tests build a Dataflow job (dry run), which needs Beam's GCP clients,
        # drive Debian's chromium through selenium (the browser test of the plugin),
        # run tools.benchmark and run a KFP package locally; pytest-xdist runs the
        # tests on two processes (most of them start subprocesses and wait).
        "test": ["pytest>=8", "pytest-xdist>=3", "apache-beam[gcp,tfrecord]==2.77.*", "selenium>=4.20",
                 "psutil>=5.9", "kfp==2.17.*"],
        # tools.benchmark samples the process's resident memory.
        "benchmark": ["psutil>=5.9"],
        "gcp": ["apache-beam[gcp,tfrecord]==2.77.*"],
        # --kfp_package: sweeps and easy/hard as Kubeflow / Vertex AI pipelines.
        "kfp": ["kfp==2.17.*"],
    },
)
