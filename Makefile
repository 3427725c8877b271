# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/multi30k
DEMO_MINUTES ?=
DEMO_TFLOP ?=
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,viz,serve,bench]'
	touch $@

setup: $(VENV)/.installed

# Train a model sized for minutes on Multi30k De->En (configs/multi30k-de-en-demo.yaml), translate
# test_2016_flickr with beam 4, score with sacreBLEU, translate one sentence. `aiayn info` first says
# what this machine can do; --precision auto (the default) picks bf16 only where it is native and
# measured faster. DEMO_MINUTES sets the training time (the recipe's 6.5 by default); DEMO_TFLOP
# adds a budget in training compute (e.g. 10: what a 2 GHz AVX2 2-core does in 6.5 minutes).
demo: setup
	rm -rf $(DEMO_OUT)
	$(PY) -m aiayn info
	$(PY) -m aiayn train --config configs/multi30k-de-en-demo.yaml --data-dir $(DATA_DIR) \
		$(if $(DEMO_MINUTES),--max-minutes $(DEMO_MINUTES)) $(if $(DEMO_TFLOP),--max-tflop $(DEMO_TFLOP)) \
		--out $(DEMO_OUT)
	$(PY) -m aiayn translate --model $(DEMO_OUT) --beam 4 \
		--input $(DATA_DIR)/test_2016_flickr.de.gz --output $(DEMO_OUT)/test.hyp.en
	$(PY) -m aiayn evaluate --hyp $(DEMO_OUT)/test.hyp.en --ref $(DATA_DIR)/test_2016_flickr.en.gz --lowercase
	echo "Ein Mann fährt Fahrrad auf einer Straße." | $(PY) -m aiayn translate --model $(DEMO_OUT)

test: setup
	AIAYN_DATA=$(DATA_DIR) $(PY) -m pytest -q -n auto --maxschedchunk 2 tests

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
