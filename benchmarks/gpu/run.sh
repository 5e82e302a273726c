#!/bin/bash
# One prepared GPU check: install abrec from a clean export of HEAD, check the compute path, run `serving`.
set -x
cd "$(dirname "$0")"
G=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc; python3 --version
python3 -m pip install -q --no-index --find-links wheels sqlalchemy alembic mako greenlet httptools orjson flask itsdangerous blinker waitress jsonschema-rs apscheduler tzlocal plotly psycopg psycopg-binary gunicorn 2>&1 | tail -3
cd src && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import abrec.models.server, torch; print('abrec ok', torch.__version__, torch.cuda.is_available())"
timeout 120 python3 $G/check.py cuda > $OUT/gpu-check.json; echo "check rc=$?"; cat $OUT/gpu-check.json
timeout ${SERVING_TIMEOUT:-330} python3 benchmarks/serving.py --duration 2.5 --rounds 3 --open-rate ${OPEN_RATE:-1000} \
  --out $OUT/serving-gpu.json --note "device machine alone: $(nvidia-smi --query-gpu=name --format=csv,noheader), $(nproc) CPU cores; load generator on the same machine" 2>&1 | grep -v "it/s\]" | tail -40
echo "serving rc=${PIPESTATUS[0]}"
ls -la $OUT
