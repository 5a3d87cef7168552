#!/bin/bash
# The gateway caches in front of a real tureen serve: cache off / exact only / exact+semantic, side by side.
# Needs redis-server and the semantic extra. Results (bench JSON and text, miss overhead) go to $OUT.
set -u
cd "$(dirname "$0")/.."
CKPT=${1:?usage: scripts/bench_gateway_cache.sh CHECKPOINT_DIR}; B=${OUT:-/tmp/cache-bench}; mkdir -p $B; N=${N:-120}; REP=${REP:-1}
export BENCH_MASTER=sk-bench-master-0123456789
redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no --daemonize no > $B/redis.log 2>&1 & RP=$!
python -m tureen.cli serve "$CKPT" --host 127.0.0.1 --port 8101 --served-model-name tiny-llama --max-model-len 512 > $B/engine.log 2>&1 & EP=$!
mk() { # name cache types
cat > $B/gw-$1.yaml <<Y
model_list:
  - model_name: tiny
    litellm_params: {model: hosted_vllm/tiny-llama, api_base: "http://127.0.0.1:8101/v1", input_cost_per_token: 1.0e-6, output_cost_per_token: 2.0e-6}
router_settings: {redis_url: "redis://127.0.0.1:6391/0", num_retries: 0}
general_settings: {master_key: os.environ/BENCH_MASTER}
tureen_settings: {require_virtual_keys: false}
litellm_settings: {cache: $2, cache_params: {type: $3, namespace: "$1:"}}
Y
}
mk off false redis; mk exact true redis; mk both true "[redis, qdrant-semantic]"
python -m tureen.cli gateway --config $B/gw-off.yaml --host 127.0.0.1 --port 4101 --log-level warning > $B/gw-off.log 2>&1 & G1=$!
python -m tureen.cli gateway --config $B/gw-exact.yaml --host 127.0.0.1 --port 4102 --log-level warning > $B/gw-exact.log 2>&1 & G2=$!
python -m tureen.cli gateway --config $B/gw-both.yaml --host 127.0.0.1 --port 4103 --log-level warning > $B/gw-both.log 2>&1 & G3=$!
for u in 8101 4101 4102 4103; do for i in $(seq 600); do curl -sf http://127.0.0.1:$u/health >/dev/null && break; sleep 0.2; done; done
run() { # port label extra-args
  curl -s -X POST http://127.0.0.1:$1/cache/flush -H "Authorization: Bearer $BENCH_MASTER" -d '{"all": true}' >/dev/null
  python -m tureen.cli bench serve --base-url http://127.0.0.1:$1 --model tiny --endpoint chat --dataset cache \
    --num-prompts $N --output-len 16 --ignore-eos --max-concurrency 4 --seed $4 --save-result $B/$2-$4.json ${@:5} > $B/$2-$4.txt 2>&1
}
for seed in $(seq 1 $REP); do
  run 4101 fresh-off x $seed --cache-repeat-ratio 0 --cache-paraphrase-ratio 0
  run 4103 fresh-both x $seed --cache-repeat-ratio 0 --cache-paraphrase-ratio 0
  run 4101 mixed-off x $seed
  run 4102 mixed-exact x $seed
  run 4103 mixed-both x $seed
done
for r in 1 2 3; do python scripts/cache_miss_overhead.py 80 4101 4102 4103 > $B/overhead-$r.txt; done
curl -s http://127.0.0.1:4103/metrics | grep -E "^tureen_gateway_cache_(lookup|embedding)_seconds_(sum|count)" > $B/metrics-both.txt
kill $G1 $G2 $G3 $EP $RP; wait
