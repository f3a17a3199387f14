# The two commands of the README: `make run` (main job) and `make test` (what .ci/run calls).
PY := .venv/bin/python
BUILD := build
SEQ := 128
BITS := 8-8-8
PT2 := $(BUILD)/smollm2-135m-s$(SEQ).pt2
PTE := $(BUILD)/smollm2-135m-s$(SEQ).quantnpu-$(BITS).pte
PROMPT := What is the capital of France?
NEW_TOKENS := 16

.PHONY: setup run test test-slow bench

setup:
	bash scripts/setup.sh

run: setup
	$(PY) tools/export.py --model smollm2 --seq-len $(SEQ) -o $(PT2)
	$(PY) tools/lower.py $(PT2) -o $(PTE) --bits $(BITS) --eval --decode
	$(PY) -m quantnpu report $(PTE:.pte=.json)
	$(PY) -m quantnpu generate $(PTE) --chat --prompt "$(PROMPT)" --max-new-tokens $(NEW_TOKENS)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The benchmarks a user runs (hours; each row in its own process, merged into bench/results/).
# bench/studies/ holds one-off investigations, run by hand.
bench: setup
	$(PY) bench/skeleton.py
	$(PY) bench/rotation.py
	$(PY) bench/static.py
	$(PY) bench/stage_one.py
	$(PY) bench/smoothing.py
	$(PY) bench/table1.py
	$(PY) bench/ablation.py
	$(PY) bench/fig4.py
	$(PY) bench/fidelity.py
