#!/bin/bash
# Train the A/B replay's three arms on the GPU at once (each with a wall-clock cap), bring them back in parts.
cd "$(dirname "$0")"
G=$PWD
python3 -m pip install -q --no-index --find-links wheels sqlalchemy alembic mako greenlet httptools orjson flask itsdangerous blinker waitress jsonschema-rs apscheduler tzlocal plotly psycopg psycopg-binary gunicorn 2>&1 | tail -3
(cd src && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3)
nvidia-smi --query-gpu=name --format=csv,noheader
for spec in tron=$1 sasrec=$2 sasrec-ssm=$3; do
  arm=${spec%=*}; min=${spec#*=}
  (cd src && python3 -m abrec.cli train --preset $arm --data $G/shared/data/diginetica --out $G/ck/$arm \
     --time-limit $min --threads 4 --device cuda --no-progress > $OUT/train-$arm.log 2>&1; echo "$arm rc=$?" >> $OUT/train-$arm.log) &
done
wait
for arm in tron sasrec sasrec-ssm; do tail -4 $OUT/train-$arm.log; python3 pack.py ck/$arm/model.safetensors $OUT/$arm; done
cat $OUT/train-*.log > $OUT/train.log; rm $OUT/train-*.log
ls -la $OUT
