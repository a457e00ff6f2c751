# The two commands of README.md. Both create .venv on first use from the pinned lock file,
# so a fresh machine needs nothing but python3 (3.11) and this repository.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench clean-demo chromium metadata

# --no-deps: the lock is complete, and it keeps img2dataset's `dataclasses` backport (which shadows
# the standard library and breaks Prefect) out of the environment.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP) metadata
	$(BIN)/curate demo configs/demo.yaml

# MetaCLIP 2's per-language lists (metaclip.worldwide), built offline from wordfreq; not committed
metadata: metadata/worldwide/en.json
metadata/worldwide/en.json: $(STAMP) metadata/build.py metadata/entries.json
	$(BIN)/python metadata/build.py --worldwide

# Debian's chromium renders the HTML report in a test; installed once when apt and root allow it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null && echo "installed chromium"; } || \
	  echo "chromium not installed: the report's browser test will be skipped"

test: $(STAMP) chromium
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests bench metadata
	$(BIN)/hadolint docker/Dockerfile

bench: $(STAMP)
	$(BIN)/python bench/download_throughput.py --repeats 3
	$(BIN)/python bench/embed_throughput.py --images 960 --workers 0 1 --repeats 2
	$(BIN)/python bench/filter_throughput.py

clean-demo:
	rm -rf runs/demo
