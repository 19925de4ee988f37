# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use (about 3 minutes),
# and never reinstall on a ready .venv (the stamp .venv/.ready is newer than the requirements).
PY := .venv/bin/python
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint setup clean-venv bench-trl

setup: .venv/.ready

.venv/.ready: requirements/cpu.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

demo: .venv/.ready
	$(PY) -m vlm_sapo.demo

test: .venv/.ready
	$(PY) -m ruff check vlm_sapo rewards tests benchmarks
	$(PY) -m pytest -q --timeout 600 tests

# vlm_sapo against TRL's GRPOTrainer on identical work (creates benchmarks/.venv-peers with TRL on first use)
bench-trl: .venv/.ready
	$(PY) benchmarks/vs_trl.py

lint: .venv/.ready
	$(PY) -m ruff check vlm_sapo rewards tests benchmarks

clean-venv:
	rm -rf .venv
