# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/multi30k
DEMO_MINUTES ?= 5
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,viz,serve,bench]'
	touch $@

setup: $(VENV)/.installed

# Train on Multi30k De->En for a few minutes (the 1-hour recipe, shortened; a few minutes give a
# low BLEU), translate the test set with beam 4, score with sacreBLEU. The full measured hour is
# `aiayn train --config configs/multi30k-de-en-1h.yaml` (README, "Results").
demo: setup
	$(PY) -m aiayn train --config configs/multi30k-de-en-1h.yaml --data-dir $(DATA_DIR) \
		--max-minutes $(DEMO_MINUTES) --warmup-steps 150 --precision bf16 --set valid_max_sentences=300 \
		--out $(DEMO_OUT)
	$(PY) -m aiayn translate --model $(DEMO_OUT) --beam 4 \
		--input $(DATA_DIR)/test_2016_flickr.de.gz --output $(DEMO_OUT)/test.hyp.en
	$(PY) -m aiayn evaluate --hyp $(DEMO_OUT)/test.hyp.en --ref $(DATA_DIR)/test_2016_flickr.en.gz --lowercase
	echo "Ein Mann fährt Fahrrad auf einer Straße." | $(PY) -m aiayn translate --model $(DEMO_OUT)

test: setup
	AIAYN_DATA=$(DATA_DIR) $(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
