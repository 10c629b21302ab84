# Two commands do everything on a fresh machine:  `make demo` and `make test`.
# Each installs what it needs into .venv first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := runs/demo

.PHONY: demo test install clean-demo ablate ablate-runs toy-data-path

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

# The paper's Figure 1 ladder on the toy world, at the recipe chosen by README Results' sweeps (the
# micro preset at 32 px, 1,500 steps at lr 3e-4, at which CLIP alone clearly learns; RECIPE): every row of
# ROWS x every seed of SEEDS is trained and evaluated, in LANES parallel runs of one thread each
# (two 2-thread runs on 2 cores run ~20x slower than two 1-thread runs); finished runs are skipped
# and half-done ones resumed, so the target can be rerun after an interruption. The untrained
# model of INIT_ROW is evaluated for every seed (--init), then everything is aggregated into
# $(ABLATE)/compare.md and radar.png, each row's differences taken against AGAINST (evaluate.py
# --against): first, the first trained row; previous, the row before it (a ladder's steps, as README's
# ladder table); last, the last row (a leave-one-out against all four, as README's).
# Override any variable:
#   make ablate ROWS="ssl,depth,ground clip,depth,ground clip,ssl,ground clip,ssl,depth clip,ssl,depth,ground"
#                                                        each objective left out once (the paper's
#                                                        synergy analysis; the full row last = INIT_ROW)
#   make ablate ROWS="clip ssl depth ground"             each objective alone
#   make ablate AGAINST=previous                         the ladder's steps: each row against the row before it
#   make ablate MODEL=tiny STEPS=2000 LR=1.5e-4 ABLATE=runs/ablate-tiny
#                                                        the wider tiny preset at its own recipe (README
#                                                        sweep): an estimated 3.8 h in 2 lanes
#   make ablate ABLATE=runs/data-2k TOY_N=2000           data scaling (number of training scenes)
#   make ablate ABLATE=runs/ablate-full CAPTIONS=full    captions that name everything (the paper's
#                                                        premise: CLIP lacks what web captions omit)
#   make ablate PRECISION=bf16                           bf16 autocast on the CPU (AVX512-BF16)
#   make ablate RECIPE='$(LADDER_RECIPE)' WEIGHTS=      the ladder before the balance (docs/ladder: momentum 0.996, no weights)
#   make ablate RECIPE=                                  train.py's own defaults (the paper as we read it) instead
#                                                        of the joining recipe README Results' sweep chose
#   make ablate EXTRA="--teacher-temp 0.02"              any other train.py flags, for every run (after RECIPE)
#   make ablate ABLATE=runs/model-s16 MODEL=S/16 SIZE=64 model scaling
ROWS   ?= clip clip,ssl clip,ssl,ground clip,ssl,depth,ground
SEEDS  ?= 0 1 2
ABLATE ?= runs/ablate
MODEL  ?= micro
SIZE   ?= 32
STEPS  ?= 1500
LR     ?= 3e-4
BATCH  ?= 32
NLOCAL ?= 2
TOY_N  ?= 8000
CAPTIONS ?= web
# toy, or shapes: the shape-only world, the positive control of self-distillation (data.py --world)
WORLD  ?= toy
PRECISION ?= auto
# How SSL trains and joins CLIP: DINO's teacher temperature held at 0.04 (the SSL sweep), SILC's fixed
# teacher momentum (the joining sweep) at 0.95, a teacher that keeps up in 1,500 steps (the token-grid
# round, docs/log-ssl-grid.md: the one change that lifted ssl alone on object shape), SLIP's
# unjittered caption view. The ladder before the balance (docs/ladder) ran at momentum 0.996: LADDER_RECIPE.
RECIPE ?= --teacher-temp 0.04 --teacher-momentum 0.95 --teacher-momentum-end 0.95 --caption-jitter 0
LADDER_RECIPE = --teacher-temp 0.04 --teacher-momentum 0.996 --teacher-momentum-end 0.996 --caption-jitter 0
# The objectives' weights, chosen by the balance round's rule (docs/log-balance.md): static weights that
# equalise the four objectives' pull on the image tower, printed by `train.py --weights-from` after a
# 300-step 4-task run (seed 0, --pull-every 25). A run of two or more tasks gets its own tasks' weights;
# a single objective has nothing to balance and gets none. The ladder before the balance ran without:
# WEIGHTS= (empty).
WEIGHTS ?= clip=0.478,ssl=0.186,depth=78,ground=0.144
EXTRA  ?=
EVAL_N ?= 2000
LANES  ?= $(shell nproc)
INIT_ROW ?= $(lastword $(ROWS))
AGAINST ?= first
comma  := ,
space  := $(subst ,, )
# The toy data's folder names the code that makes it (train.toy_code_key: the same digest of data.py
# and pseudolabel.py), so a change to the world or the simulated experts makes it anew: a cache made
# by other code is never reused, and a run begun on other data refuses to resume on it. The key is
# fixed once per `make ablate` (passed to the lanes' make), and runs read the data through --data.
ifndef TOYKEY
TOYKEY := $(shell cat data.py pseudolabel.py | sha256sum | cut -c1-12)
endif
ifeq ($(filter $(WORLD),toy shapes),)
$(error WORLD=$(WORLD) is not a world of data.py; use toy or shapes)
endif
ifeq ($(filter $(AGAINST),first previous last),)
$(error AGAINST=$(AGAINST) is not one of first, previous, last: the row evaluate.py --against compares with)
endif
ifeq ($(TOYKEY),)
$(error cannot hash data.py and pseudolabel.py for the toy data's name: sha256sum is needed)
endif
TOYDATA = runs/toy-data/$(if $(filter shapes,$(WORLD)),shapes1,world2)-$(CAPTIONS)-n$(TOY_N)-px$(SIZE)-$(TOYKEY)
RUNS    = $(foreach t,$(ROWS),$(foreach s,$(SEEDS),$(ABLATE)/$(subst $(comma),+,$(t))-seed$(s)))
INITS   = $(foreach s,$(SEEDS),$(ABLATE)/$(subst $(comma),+,$(INIT_ROW))-seed$(s)/eval-init/results.json)
ONE     = OMP_NUM_THREADS=1 $(PY)
run_list  = $(subst +, ,$(firstword $(subst -seed, ,$(1))))
run_tasks = $(subst $(space),$(comma),$(call run_list,$(1)))
run_seed  = $(lastword $(subst -seed, ,$(1)))
run_weights = $(if $(and $(WEIGHTS),$(word 2,$(call run_list,$(1)))),--loss-weights $(subst $(space),$(comma),$(strip \
	$(foreach w,$(subst $(comma), ,$(WEIGHTS)),$(if $(filter $(firstword $(subst =, ,$(w))),$(call run_list,$(1))),$(w))))))
reverse   = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))

ablate: $(VENV)/.installed $(TOYDATA)/made-by.json
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory -j $(LANES) ablate-runs TOYKEY=$(TOYKEY) || exit 1; \
	echo "ablate: $(words $(RUNS)) runs in $(LANES) lanes, $$(( ($$(date +%s) - start) / 60 )) min wall"
	$(PY) evaluate.py --compare $(RUNS) --against $(AGAINST) --out $(ABLATE)

# the dearest rows first, so that no lane idles at the end while another finishes a long run
ablate-runs: $(addsuffix /eval/results.json,$(call reverse,$(RUNS))) $(INITS)

# The toy world once, by train.py itself, so that parallel lanes do not race to write it.
$(TOYDATA)/made-by.json: $(VENV)/.installed
	$(PY) train.py --prepare-data --model $(MODEL) --image-size $(SIZE) --toy-n $(TOY_N) --captions $(CAPTIONS) --world $(WORLD)
	@test -f $@ || { echo "train.py made the toy data elsewhere than $(TOYDATA)"; exit 1; }

# toy-data-path: where this checkout's toy data lives (a test compares it with train.py's)
toy-data-path:
	@echo $(TOYDATA)

$(ABLATE)/%/eval/results.json: $(TOYDATA)/made-by.json
	@mkdir -p $(ABLATE)/$* && echo "start $* (log: $(ABLATE)/$*/log.txt)"
	@$(ONE) train.py --tasks $(call run_tasks,$*) --seed $(call run_seed,$*) --model $(MODEL) \
		--image-size $(SIZE) --steps $(STEPS) --lr $(LR) --batch-size $(BATCH) --n-local $(NLOCAL) \
		--data '$(TOYDATA)/labelled/train-*.tar' --val-data '$(TOYDATA)/labelled/val-*.tar' --precision $(PRECISION) $(RECIPE) $(call run_weights,$*) $(EXTRA) --log-every 50 --ckpt-every 100 --out $(ABLATE)/$* --resume latest \
		> $(ABLATE)/$*/log.txt 2>&1 || { tail -3 $(ABLATE)/$*/log.txt; exit 1; }
	@$(ONE) evaluate.py $(ABLATE)/$*/checkpoint.pt --n $(EVAL_N) > $(ABLATE)/$*/eval.log 2>&1 \
		|| { tail -3 $(ABLATE)/$*/eval.log; exit 1; }
	@echo "done  $* ($$(tail -1 $(ABLATE)/$*/metrics.jsonl | cut -c1-60)...)"

$(ABLATE)/%/eval-init/results.json: $(ABLATE)/%/eval/results.json
	@$(ONE) evaluate.py $(ABLATE)/$*/checkpoint.pt --n $(EVAL_N) --init > $(ABLATE)/$*/eval-init.log 2>&1 \
		|| { tail -3 $(ABLATE)/$*/eval-init.log; exit 1; }
	@echo "done  $* at initialisation"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
