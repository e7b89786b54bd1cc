"""A pipeline's stages as a Kubeflow Pipelines package, for Kubeflow
Pipelines and Vertex AI Pipelines (the KFP SDK 2, extra `[kfp]`).

Every stage becomes a task that runs the same program with the same flags on
the same output directory, limited to that stage (`--only=<stage> --noreport`),
after the tasks of its input stages; training tasks ask for the machine and
accelerator given here; a last task runs the program whole, which finds every
stage complete and writes the report. The stage runner's own caching and
locks work as on one machine (KFP's caching is off: the manifests decide), so
the output directory (a `gs://` path on Vertex AI) holds what a local run
would: the report, tools.plot and TensorBoard read it alike.

The tasks run in an image holding this package and its checkout (the
Dockerfile at the repository's root; `workdir` is the checkout in it, where
the programs' relative flagfiles resolve).
"""

import dataclasses
import re

from cg_tf.experiments.runner import Stage

# The stage kind whose tasks get the training resources.
TRAINING_KIND = "train"


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a training task asks for: CPU ("8"), memory ("32G"), and an
    accelerator type and count (Vertex AI's names: "NVIDIA_TESLA_T4",
    "NVIDIA_L4", "TPU_V5_LITEPOD"; KFP on Kubernetes: a resource such as
    "nvidia.com/gpu")."""

    cpu: str | None = None
    memory: str | None = None
    accelerator_type: str | None = None
    accelerator_count: int = 1

    def __post_init__(self):
        if self.cpu is not None and not (re.fullmatch(r"\d+(\.\d+)?m?", self.cpu)
                                         and float(self.cpu.rstrip("m")) > 0):
            raise ValueError(f"--kfp_cpu must be a positive number of CPUs (8, 0.5, 500m), "
                             f"got {self.cpu!r}")
        if self.memory is not None and not (
                re.fullmatch(r"\d+(\.\d+)?([KMGTPE]i?)?", self.memory)
                and float(re.match(r"[\d.]+", self.memory).group()) > 0):
            raise ValueError(f"--kfp_memory must be a positive size (32G, 512Mi), got "
                             f"{self.memory!r}")
        if self.accelerator_count < 1:
            raise ValueError(f"--kfp_accelerator_count must be positive, got "
                             f"{self.accelerator_count}")

    def apply(self, task) -> None:
        if self.cpu:
            task.set_cpu_limit(self.cpu)
        if self.memory:
            task.set_memory_limit(self.memory)
        if self.accelerator_type:
            task.set_accelerator_type(self.accelerator_type)
            task.set_accelerator_limit(self.accelerator_count)


def _import_kfp():
    try:
        from kfp import compiler, dsl
    except ImportError:
        raise ValueError("--kfp_package needs the KFP SDK: pip install -e \".[kfp]\"") from None
    return compiler, dsl


def stage_component(image: str):
    """The one component every task runs: the program, limited to a stage
    (or whole, for the report), in `workdir`."""
    _, dsl = _import_kfp()

    @dsl.component(base_image=image, install_kfp_package=False)
    def run_stage(workdir: str, program: str, args: list, output_dir: str, only: str):
        import subprocess
        import sys
        limit = [f"--only={only}", "--noreport"] if only else []
        subprocess.run([sys.executable, "-m", program, *args, f"--output_dir={output_dir}",
                        *limit], cwd=workdir, check=True)

    return run_stage


def pipeline_function(name: str, program: str, args: list[str], stages: list[Stage],
                      image: str, workdir: str, output_dir: str, training: Resources):
    """The @dsl.pipeline of `stages` (its parameters: output_dir, workdir)."""
    _, dsl = _import_kfp()
    component = stage_component(image)

    @dsl.pipeline(name=name, description=f"python -m {program}, one task per stage")
    def pipeline(output_dir: str = output_dir, workdir: str = workdir):
        tasks = {}
        for stage in stages:
            task = component(workdir=workdir, program=program, args=args,
                             output_dir=output_dir, only=stage.name)
            task.set_display_name(stage.name).set_caching_options(False)
            for name_ in stage.inputs:
                task.after(tasks[name_])
            if stage.kind == TRAINING_KIND:
                training.apply(task)
            tasks[stage.name] = task
        report = component(workdir=workdir, program=program, args=args, output_dir=output_dir,
                           only="")
        report.set_display_name("report").set_caching_options(False)
        for task in tasks.values():
            report.after(task)

    return pipeline


def compile_package(path: str, name: str, program: str, args: list[str], stages: list[Stage],
                    image: str, workdir: str, output_dir: str, training: Resources) -> None:
    """Writes the pipeline package (YAML) to `path`."""
    compiler, _ = _import_kfp()
    compiler.Compiler().compile(
        pipeline_function(name, program, args, stages, image, workdir, output_dir, training),
        path)
