#!/usr/bin/env bash
# Sets up a one-node Slurm cluster for the tests and prints the `export` lines that tell them where it is
# (.ci/run evals them). Being written now.
set -euo pipefail
