# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2

.PHONY: demo test install clean

$(BIN)/fedsq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(BIN)/fedsq

# The main job: the offline grid (digits, EfficientNet-Lite0 / ResNet-18) end to end.
demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/offline.yaml
	$(BIN)/snakemake --configfile config/offline.yaml --report results/report.html
	@echo "Tables: results/tables/  plots: results/plots/  report: results/report.html"
	@echo "MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///results/mlflow.db"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf results resources .snakemake
