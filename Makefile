# Two commands on a fresh machine with Python ≥ 3.11:
#   make demo   — train the digits MLP with the live view, write runs/digits.zarr
#   make test   — run the test suite
# Both create .venv and install what they need (torch pinned to the CPU build in constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/mlp_digits.py --overwrite --epochs 30 --store runs/digits.zarr

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check streamspec tests examples bench
	$(BIN)/ruff format --check streamspec tests examples bench
	$(BIN)/mypy streamspec

bench: $(STAMP)
	$(BIN)/python -m bench --device cpu

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
