# Two commands do everything on a fresh machine:  `make demo` and `make test`.
# Each installs what it needs into .venv first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := runs/demo

.PHONY: demo test install clean-demo ablate

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[experts,dev]'
	touch $@

install: $(VENV)/.installed

# The main job end to end on the toy world, on a CPU: scenes -> simulated experts -> training of
# all four tasks -> evaluation table and plots. Everything lands in runs/demo/.
demo: $(VENV)/.installed
	$(PY) data.py --out $(DEMO)/data --n 4000 --val-n 512
	$(PY) pseudolabel.py --shards '$(DEMO)/data/*.tar' --out $(DEMO)/labelled \
		--depth-expert simulated --ground-expert simulated
	$(PY) data.py --preview $(DEMO)/labelled/val-000000.tar --png $(DEMO)/preview.png
	$(PY) train.py --tasks clip,ssl,depth,ground --data '$(DEMO)/labelled/train-*.tar' \
		--val-data '$(DEMO)/labelled/val-*.tar' --steps 120 --batch-size 32 --out $(DEMO)/train
	$(PY) evaluate.py $(DEMO)/train/checkpoint.pt --data '$(DEMO)/labelled/val-*.tar'
	$(PY) evaluate.py --compare $(DEMO)/train --out $(DEMO)/train/eval
	@echo "demo done: see $(DEMO)/preview.png, $(DEMO)/train/losses.png, $(DEMO)/train/eval/"

# The paper's Figure 1 ladder on the toy world: every row of ROWS x every seed of SEEDS is trained
# and evaluated, then aggregated into runs/ablate/compare.md and radar.png. Override any variable:
#   make ablate ROWS="clip,ssl,depth,ground ssl,depth,ground clip,depth,ground clip,ssl,ground clip,ssl,depth"
#   make ablate ROWS="clip ssl depth ground"             each objective alone
#   make ablate ABLATE=runs/data-2k TOY_N=2000           data scaling (number of training scenes)
#   make ablate ABLATE=runs/model-s16 MODEL=S/16 SIZE=64 model scaling
ROWS   ?= clip clip,ssl clip,ssl,ground clip,ssl,depth,ground
SEEDS  ?= 0 1 2
ABLATE ?= runs/ablate
MODEL  ?= tiny
SIZE   ?= 32
STEPS  ?= 300
BATCH  ?= 32
TOY_N  ?= 8000
EVAL_N ?= 400
comma  := ,
RUNS    = $(foreach t,$(ROWS),$(foreach s,$(SEEDS),$(ABLATE)/$(subst $(comma),+,$(t))-seed$(s)))

ablate: $(VENV)/.installed
	@for t in $(ROWS); do for s in $(SEEDS); do \
		run=$(ABLATE)/$$(echo $$t | tr , +)-seed$$s; \
		[ -f $$run/eval/results.json ] && { echo "$$run done"; continue; }; \
		$(PY) train.py --tasks $$t --seed $$s --model $(MODEL) --image-size $(SIZE) --steps $(STEPS) \
			--batch-size $(BATCH) --toy-n $(TOY_N) --log-every 50 --ckpt-every 100 --out $$run \
			--resume latest || exit 1; \
		$(PY) evaluate.py $$run/checkpoint.pt --n $(EVAL_N) || exit 1; \
	done; done
	$(PY) evaluate.py --compare $(RUNS) --out $(ABLATE)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
