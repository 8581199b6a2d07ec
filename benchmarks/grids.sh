#!/usr/bin/env bash
# Tables 4 and 5 on the samples at a small budget (see benchmarks/README.md, "Study grids").
# From the repository root, in the project's virtualenv: bash benchmarks/grids.sh
# ~20 min per seed on 2 cores. Tables land in benchmarks/results/grids/.
# Every cell runs once per seed (SEEDS, a YAML list; default three) so the tables can tell an
# effect from seed noise; a study YAML's own `seeds:` wins. A study restores what it ran
# before: remove runs/bench/studies/NAME after changing the seeds.
set -euo pipefail
samples=${SAMPLES:-../shared/datasets}
seeds=${SEEDS:-"[42, 1, 2]"}
data=runs/bench/data
export RAY_DATA_USE_DATASOURCE_V2=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# 70/30: the samples are small, and a larger validation split makes the deltas less noisy
split=(--split 0.7,0.3,0 --seed 42 --num-cpus 2)
matsci-ray ingest materials-project "$samples/materials_project/summary_docs.jsonl" --out $data "${split[@]}"
matsci-ray ingest lips "$samples/lips/lips_devset.extxyz" --out $data "${split[@]}"
matsci-ray ingest oc20-s2ef "$samples/oc20/trajectories" --out $data "${split[@]}"
matsci-ray ingest oc20-is2re "$samples/oc20/trajectories" --out $data "${split[@]}"
configs=$(mktemp -d)
trap 'rm -r "$configs"' EXIT
for study in single_mp task_pairs single_energy dataset_pairs; do
    config=$configs/$study.yaml  # the study as committed, plus the seeds
    cp "benchmarks/studies/$study.yaml" "$config"
    grep -q '^seeds:' "$config" || echo "seeds: $seeds" >> "$config"
    matsci-ray study "$config" --num-cpus 2
done
# each pair table against the single-task runs of its own budget
studies=runs/bench/studies
matsci-ray report $studies/single-mp $studies/task-pairs --out benchmarks/results/grids/task-pairs --no-plots
matsci-ray report $studies/single-energy $studies/dataset-pairs --out benchmarks/results/grids/dataset-pairs --no-plots
