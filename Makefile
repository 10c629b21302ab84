# Two commands do everything on a fresh machine:  `make demo` and `make test`.
# Each installs what it needs into .venv first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := runs/demo

.PHONY: demo test install clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[experts,dev]'
	touch $@

install: $(VENV)/.installed

# The main job end to end on the toy world, on a CPU: scenes -> simulated experts -> training of
# all four tasks -> evaluation table and plots. Everything lands in runs/demo/.
demo: $(VENV)/.installed
	$(PY) data.py --out $(DEMO)/data --n 6000 --val-n 512
	$(PY) pseudolabel.py --shards '$(DEMO)/data/*.tar' --out $(DEMO)/labelled \
		--depth-expert simulated --ground-expert simulated
	$(PY) data.py --preview $(DEMO)/labelled/val-000000.tar --png $(DEMO)/preview.png
	$(PY) train.py --tasks clip,ssl,depth,ground --data '$(DEMO)/labelled/train-*.tar' \
		--val-data '$(DEMO)/labelled/val-*.tar' --out $(DEMO)/train
	$(PY) evaluate.py $(DEMO)/train/checkpoint.pt --data '$(DEMO)/labelled/val-*.tar'
	@echo "demo done: see $(DEMO)/preview.png, $(DEMO)/train/losses.png, $(DEMO)/train/eval/"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
