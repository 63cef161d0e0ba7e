# Two entry points, both self-installing on a fresh machine:
#   make demo   pretrain a small Llama on the standard library with DeepSpeed + the AtteNT teacher
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# A CPU machine needs no particular torch; 2.14.1 pairs with the torchvision streaming pulls in.
TORCH_SPEC ?= torch==2.14.1
BIN := $(VENV)/bin

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[test]"
	touch $@

demo: setup
	$(BIN)/attent-pretrain --deepspeed_config configs/zero1.json --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .cache .pytest_cache
