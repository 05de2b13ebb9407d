#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct), builds kedit and runs the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(./scripts/fetch-model.sh)
cargo build --release --quiet
./target/release/kedit inspect --model "$model"
./target/release/kedit generate --model "$model" --prompt "The capital of France is" --max-new-tokens 16
# The main job: rewrite one fact with ROME and see the metrics and continuations before and after.
./target/release/kedit apply --model "$model" --editor ROME \
    --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" --target Rome \
    --locality-prompt "The capital of Germany is" --locality-answer Berlin
