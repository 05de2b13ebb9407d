#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct), builds kedit and runs the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(./scripts/fetch-model.sh)
cargo build --release --quiet
./target/release/kedit inspect --model "$model"
./target/release/kedit generate --model "$model" --prompt "The capital of France is" --max-new-tokens 16
