#!/usr/bin/env bash
# CPU precision benchmark (`make bench-cpu`): the 120-sentence request end to end over HTTP
# through the sentence-classifier plugin, one client, with cpu_dtype fp32, bf16, int8 and auto,
# as TorchScript traces (cpu_backend: torchscript), as AOTInductor packages where the export has
# them (cpu_backend: aoti; deberta-v3-base), and auto over both, beside the seed's way in Python (transformers eager, batches of 32 in input order, fp32), on
# the same model, in one run. The response cache is off.
#
#   tools/bench_cpu.sh [MODEL...]     default: minilm-topics deberta-v3-base
#
# deberta-v3-base is a checkpoint with DeBERTa-v3-base's full shapes and random weights
# (tests/fixtures/make_deberta_checkpoint.py --size base), exported with
# `tools/export_model.py checkpoint` like a user's own; the Python baseline loads the same
# checkpoint. REQUESTS (default 5) requests per setup after the server's warm-up. Prints the
# Markdown tables (tools/bench_table.py), with each setup's top-label agreement with fp32 on the
# fixture, and keeps the JSON lines in target/bench-cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
[ ${#models[@]} = 0 ] && models=(minilm-topics deberta-v3-base)
out=target/bench-cpu
mkdir -p "$out"
for model in "${models[@]}"; do
  results=$out/$model.jsonl
  : > "$results"
  case $model in
    minilm-topics) source=(default) ;;
    deberta-v3-base) source=(checkpoint models/checkpoints/deberta-v3-base) ;;
    *) echo "unknown model $model (minilm-topics or deberta-v3-base)" >&2; exit 2 ;;
  esac
  .venv/bin/python tools/seed_baseline.py --device cpu --dtype float32 --rounds "${REQUESTS:-5}" --setup input:32 "${source[@]}" \
    2> "$out/python.log" | tee -a "$results"
  REQUESTS_PER_CLIENT=${REQUESTS:-5} OUT_DIR=$out/serving ALONE=${ALONE:-120} BACKEND=torchscript \
    bash tools/bench_serving.sh "$model" 1 batchbox:fp32 batchbox:bf16 batchbox:int8 | tee -a "$results"
  packages=$(.venv/bin/python -c "import json; v = json.load(open('models/$model/manifest.json'))['variants']
dtypes = {'cpu-float32-aoti': 'fp32', 'cpu-bfloat16-aoti': 'bf16'}
print(' '.join('batchbox:' + dtypes[n] for n in v if n in dtypes))")
  if [ -n "$packages" ]; then
    # shellcheck disable=SC2086
    REQUESTS_PER_CLIENT=${REQUESTS:-5} OUT_DIR=$out/serving ALONE=${ALONE:-120} BACKEND=aoti \
      bash tools/bench_serving.sh "$model" 1 $packages | tee -a "$results"
  fi
  # auto: every precision in every format the export has, measured at load.
  REQUESTS_PER_CLIENT=${REQUESTS:-5} OUT_DIR=$out/serving ALONE=${ALONE:-120} BACKEND=auto \
    bash tools/bench_serving.sh "$model" 1 batchbox:auto | tee -a "$results"
  echo
  echo "### $model"
  echo
  .venv/bin/python tools/bench_table.py "$results" --agreement-with fp32
  # What auto measured at load, per candidate.
  .venv/bin/python -c "
import json, sys
for line in open('$results'):
    run = json.loads(line)
    if run.get('dtype') == 'auto':
        for c in run['precision_choice']['candidates']:
            a, i = c.get('agreement'), c.get('invariance')
            kind = c['precision'] + (' (AOTInductor)' if c.get('format') == 'aoti' else '')
            said = [f\"{c['median_ms']:.1f} ms on its warm-up batch\" if 'median_ms' in c else 'not timed']
            if c.get('reference'):
                said.append('the reference')
            if c.get('not_checked'):
                said.append('not checked: ' + c['not_checked'])
            if a:
                said.append(f\"top labels agreeing with fp32 {a['agreeing']}/{a['compared']} over {a['texts']} texts, max |dp| {a['max_abs_diff']:.1e}\")
            if i:
                said.append(f\"batch invariance {i['max_abs_diff']:.1e} (bound {i['bound']:g})\")
            said.append('eligible' if c['eligible'] else 'not eligible')
            print(f'auto measured {kind}: ' + '; '.join(said))
"
done
