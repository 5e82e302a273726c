"""Session recommenders for abrec: data, SASRec / TRON / GRU4Rec+, training, offline evaluation.

Modules, one job each:
- data.py: readers (plain session text, OTTO jsonl, raw Diginetica csv, Yoochoose clicks),
  the paper's preprocessing, `ItemMap` (shop ids <-> 1..N, 0 = padding), `load_dataset`,
  the seeded synthetic shop.
- sasrec.py (SASRec; TRON is SASRec trained with presets "tron"/"tron-l"), gru4rec.py.
- negatives.py (uniform / in-batch / top-k samplers, accidental-hit masking), losses.py
  (BCE, BPR-max, sampled softmax).
- presets.py: the paper's configurations and `build_model(kind, config, num_items)`.
- train.py: the training loop; evaluate.py: Recall/MRR@k over every next click.
- checkpoint.py: one safetensors file per model; inference.py: batched scoring and top-k.
- cli.py: `abrec train`, `abrec evaluate`. registry.py, store.py, server*.py, client.py: the
  model registry and model server (built on checkpoint.py and inference.py).

Quick start:

    abrec train --preset tron --data synthetic --epochs 3 --out runs/tron
    abrec evaluate runs/tron/model.safetensors --data synthetic
    abrec train --preset tron --data ../shared/data/diginetica --time-limit 60

Multi-process training: `torchrun --nproc-per-node 2 -m abrec.cli train --preset tron ...` runs
DistributedDataParallel (gloo on CPU, nccl on GPUs); each process draws its own batch-shared and
in-batch negatives from its own batch, as one GPU's batch does in the paper (see train.py).
"""
