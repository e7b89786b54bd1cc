#!/usr/bin/env bash
# The ImageNet path end to end on one CPU machine: an ImageNet-shaped folder
# (tools.make_image_folder: 100 classes x 20 training images, 500 flat
# validation images with their label file, 182 MB of JPEGs), its Beam build
# (50% uniform noise, 16 shards), what opening it and reading it cost
# (tools.benchmark_input; at 224x224 also with each augmentation), then the
# ImageNet configs as they are, at a CPU-sized batch and image size, on two
# replicas (logical CPUs): ResNet-18 for 300 steps, stopped by SIGTERM and
# resumed, then VGG-13-BN (eight times ResNet-18's arithmetic) for 300 steps,
# at the config's lr 0.1 and at 0.0125 (0.1 x 32 / 256, the linear scaling
# rule for the CPU-sized batch), and the RM3 and M3 sweeps for 300.
#
#   bash docs/measurements/imagenet_shaped/run.sh [WORK_DIR]    (from the checkout)
#
# Logs and run summaries are copied beside this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/imagenet_shaped}"
mkdir -p "$work"
small=(--num_cpu_devices=2 --image_size=64,64 --batch_size=32 --eval_every=100
       --checkpoint_every=100 --log_every=20 --eval_sample_size=250)

[ -d "$work/folder" ] || python -m tools.make_image_folder --output_dir="$work/folder" \
  | tee "$here/folder.log"
[ -f "$work/data/dataset_info.json" ] || /usr/bin/time -v python -m pipelines.noisy_labels \
  --source=imagefolder:"$work/folder" --output_dir="$work/data" --noise_rate=0.5 \
  --num_shards=16 > "$here/build.log" 2>&1
for size in 224,224 64,64; do
  python -m tools.benchmark_input --data_dir="$work/data" --workers=1 --batch_size=32 \
    --steps=30 --streamed --image_size=$size
done > "$here/input.log" 2>&1
# The same at 224x224 with each augmentation (the ImageNet configs take none).
for augment in none flip flip_crop randaugment; do
  python -m tools.benchmark_input --data_dir="$work/data" --workers=1 --batch_size=32 \
    --steps=30 --streamed --image_size=224,224 --augment=$augment
done > "$here/input_augment.log" 2>&1

train() {  # NAME FLAGFILE [FLAGS...]: one run, its log kept (run under $STOP if set)
  local name=$1 flagfile=$2; shift 2
  ${STOP:-} python -m cg_tf.train --flagfile="$flagfile" --data_dir="$work/data" \
    --model_dir="$work/runs/$name" "${small[@]}" "$@" >> "$here/$name.log" 2>&1
}
# Stopped by SIGTERM after 45 s (a preempted worker; mid-run whether the machine is quiet,
# 300 steps taking about 95 s, or loaded), then resumed.
STOP="timeout -s TERM 45" train resnet18 configs/resnet18_imagenet.flags --steps=300 || true
train resnet18 configs/resnet18_imagenet.flags --steps=300
train vgg13 configs/vgg13_imagenet.flags --steps=300
train vgg13_lr0.0125 configs/vgg13_imagenet.flags --steps=300 --learning_rate=0.0125
for sweep in rm3 m3; do
  python -m pipelines.sweep --flagfile=configs/sweep_${sweep}_imagenet_resnet18.flags \
    --source=imagefolder:"$work/folder" --num_shards=16 --output_dir="$work/sweep_$sweep" \
    "${small[@]}" \
    --steps=300 $([ $sweep = m3 ] && echo --batch_size=96) > "$here/sweep_$sweep.log" 2>&1
done
for run in "$work"/runs/*; do cp "$run/summary.json" "$here/$(basename "$run").json"; done
for sweep in rm3 m3; do
  for run in "$work/sweep_$sweep"/runs/*; do
    cp "$run/summary.json" "$here/sweep_${sweep}_$(basename "$run").json"
  done
done
