# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2

.PHONY: demo evidence test gpu-smoke install lock clean

# The versions of requirements.lock (-c: constraints, so other platforms skip what they lack):
# without them pip's resolver backtracks for many minutes through mlflow's releases to meet
# flwr's and Snakemake's pins. After changing pyproject's dependencies, `make lock` again.
$(BIN)/fedsq: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c requirements.lock -e '.[test,flower]'
	touch $@

install: $(BIN)/fedsq

# The main job: the offline grid (digits, EfficientNet-Lite0 / ResNet-18) end to end.
demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/offline.yaml
	$(BIN)/snakemake --configfile config/offline.yaml --report results/report.html
	@echo "Tables: results/tables/  plots: results/plots/  report: results/report.html"
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///results/mlflow.db"

# The evidence grid (config/evidence.yaml) in its own folder (evidence/), so it never mixes with
# the demo's runs. Every finished run's record goes to evidence/records/ (committed); a record whose
# key still matches is reused, so a grid longer than one sitting continues where the last one
# stopped, on any machine. Each sitting's time is appended to evidence/records/sittings.csv; then
# the README's evidence section is written from the records.
EVIDENCE := evidence
evidence: install
	mkdir -p $(EVIDENCE)/records
	$(BIN)/python scripts/evidence_sitting.py $(EVIDENCE) -- $(BIN)/snakemake --snakefile $(CURDIR)/Snakefile \
		--directory $(EVIDENCE) --configfile $(CURDIR)/config/evidence.yaml --cores $(CORES) --keep-going
	$(BIN)/python scripts/readme_results.py $(EVIDENCE)/records --out $(EVIDENCE)/report

test: install
	$(BIN)/python -m pytest

# The first thing to run on a new GPU cluster: every method on CUDA (bf16, channels-last),
# DualCopy exact on the GPU, resume after kill -9. Minutes; skips (exit 0) without a GPU.
gpu-smoke: install
	$(BIN)/python scripts/gpu_smoke.py

# Exact versions of everything in the venv but fedsq itself, to reinstall what produced a result:
# pip install -r requirements.lock -e .   (torch's CUDA wheels make it platform-specific: see the header)
lock: install
	{ echo "# make lock: pip freeze of $(VENV), Python $$($(BIN)/python -c 'import platform as p; print(p.python_version(), p.system(), p.machine())')"; \
	  $(BIN)/pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf results resources .snakemake $(EVIDENCE)
