#!/usr/bin/env bash
# The main job: set up, train (or reuse) transcoders for SmolLM2-135M on the Brown corpus,
# ingest the catalog, and answer a few questions about a late-layer feature. Offline throughout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

out=${OUT:-data/smollm2-135m}
cc=.venv/bin/circuit-catalog
# where and in what precision the model runs, for the commands that run it (README, "On a GPU"), e.g.
# COMPUTE="--device cuda --dtype bfloat16"; by default CUDA when available, else the CPU, in float32
compute=${COMPUTE:-}
prompt="The capital of France is"

echo "== 1. transcoders: one skip transcoder per layer, 1536 features, BatchTopK k = 32, 40k Brown tokens x 4 epochs,"
echo "      dead features resampled 6 times"
# lr 1e-3 rather than 4e-4: this budget allows ~1,250 steps, where 1e-3 reaches a lower FVU (README, "Training")
$cc train --model smollm2-135m --dataset brown --d-sae 1536 --tokens 40000 --epochs 4 --lr 1e-3 --k 32 --skip --resamples 6 \
    --out "$out/transcoders" $compute

echo "== 2. catalog: pullbacks for every layer pair, de-embeddings, logit lens, activation statistics,"
echo "      and the attribution graphs of five prompts (scripts/demo_prompts.jsonl)"
$cc ingest --model smollm2-135m --transcoders "$out/transcoders" --catalog "$out/catalog" --top-k 16 \
    --dataset brown --tokens 16384 --prompts scripts/demo_prompts.jsonl $compute

echo "== 2b. the transcoders' quality on held-out Brown tokens (past the training tokens): per-layer FVU, L0, dead"
echo "       features, and the next-token loss with every MLP replaced (CE loss recovered), kept for the overview report"
$cc eval --model smollm2-135m --transcoders "$out/transcoders" --tokens 512 --out "$out/catalog/eval.json" $compute

echo "== 3. load the catalog into the embedded graph store (LadybugDB, at $out/catalog/graph)"
$cc load --catalog "$out/catalog"

echo "== 4. which late-layer features fire on the last token of: $prompt; and the feature the prediction of ' Paris'"
echo "      depends on most there (influence in the prompt's attribution graph: raw activation favours dense features)."
echo "      A warm \`serve\` process loads the model once and answers the three \`active\` calls"
serve_log=$(mktemp)
$cc serve --model smollm2-135m --transcoders "$out/transcoders" --idle-minutes 10 $compute 2> "$serve_log" &
server=$!
trap 'kill $server 2> /dev/null || true; rm -f "$serve_log"' EXIT
until grep -q '^serving' "$serve_log"; do
    kill -0 $server 2> /dev/null || { cat "$serve_log" >&2; exit 1; }
    sleep 0.5
done
$cc active --model smollm2-135m --transcoders "$out/transcoders" --prompt "$prompt" --layers 26-29 -k 5 $compute
$cc active --model smollm2-135m --transcoders "$out/transcoders" --prompt "$prompt" --rank influence --target " Paris" -k 5 $compute
feature=$($cc active --model smollm2-135m --transcoders "$out/transcoders" --prompt "$prompt" --rank influence --target " Paris" -k 1 --format ids $compute)
kill $server

echo "== 5. what $feature reads and writes, what feeds it (Cypher over the store)"
$cc show "$feature" --catalog "$out/catalog" -k 8

echo "== 6. how often $feature fires, and on what (DuckDB over the statistics' Parquet)"
$cc stats "$feature" --catalog "$out/catalog" -k 5
$cc sql "SELECT layer, round(avg(frequency), 4) AS mean_frequency, sum(CASE WHEN live THEN 1 ELSE 0 END) AS live FROM stats GROUP BY layer ORDER BY layer DESC LIMIT 5" --catalog "$out/catalog"

echo "== 7. which features write ' Paris', and the strongest weight paths from 'France' to ' Paris'"
$cc search Paris --catalog "$out/catalog" -k 5
$cc paths --catalog "$out/catalog" --from-token France --to-logit Paris --max-hops 1 -k 5

echo "== 8. on the prompt itself: its attribution graph, the strongest paths from 'France' to ' Paris', and"
echo "      the features that recur across the five prompts' graphs"
$cc graph --catalog "$out/catalog" --prompt "$prompt" -k 8
$cc paths --catalog "$out/catalog" --prompt "$prompt" --from-token France --to-logit Paris -k 5
$cc recurring --catalog "$out/catalog" -k 5
$cc prompts-using "$feature" --catalog "$out/catalog"

echo "== 9. test the circuit: ablate the graph's 20 most influential features (and its strongest paths' features)"
echo "      one check at a time: the graph's predicted logit change beside the change measured with only direct effects"
echo "      (equal: the graph is exact there) and in the full model; then ablate $feature at the last token (recorded)"
$cc intervene --model smollm2-135m --transcoders "$out/transcoders" --catalog "$out/catalog" --prompt "$prompt" --validate -k 20 $compute
$cc intervene --model smollm2-135m --transcoders "$out/transcoders" --catalog "$out/catalog" --prompt "$prompt" \
    --set "$feature@-1=0" --target " Paris" -k 5 $compute

echo "== 10. HTML reports: a feature card for $feature (and its neighbours' cards), the prompt's attribution graph,"
echo "      then the catalog overview"
$cc report feature "$feature" --catalog "$out/catalog" --with-neighbours > /dev/null
prompt_report=$($cc report prompt "$prompt" --catalog "$out/catalog")
$cc report overview --catalog "$out/catalog" > /dev/null
echo "catalog overview: $out/catalog/reports/overview.html"
echo "feature card:     $out/catalog/reports/$(echo "$feature" | tr / _).html"
echo "prompt graph:     $prompt_report"
