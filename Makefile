# vitlab: `make demo` and `make test` work on a fresh machine; both install first if needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
VITLAB := $(VENV)/bin/vitlab
DATA   ?= data/digits

.PHONY: install browser demo test test-fast test-gpu lint clean

install: $(VENV)/.installed browser

# The MLflow UI test drives Debian's headless Chromium through chromedriver; installed when missing and this
# user may (root, as on CI and the cluster images); elsewhere that test is skipped and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
				|| { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
				|| echo "make: chromium not installed (the MLflow UI test will be skipped)"; \
		else echo "make: no chromium and not root: the MLflow UI test will be skipped"; fi; fi

# torch/torchvision are pinned to the wheels on this machine's disk and installed first, so the
# project's torch range is already satisfied and pip does not download another multi-GB torch.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on the built-in data: prepare the digits shards once, then train a fresh run of
# jobs/digits_vit.yaml (a new run name each time; re-using a name would resume that run instead).
demo: $(VENV)/.installed
	test -f $(DATA)/manifest.json || $(VITLAB) data prepare digits --out $(DATA)
	$(VITLAB) train jobs/digits_vit.yaml run.name=digits_vit_$$(date +%Y%m%d_%H%M%S) \
		--output-json runs/digits_vit_demo.json

lint: install
	$(VENV)/bin/ruff check platform tests

# Every test: the unit tier (pure), the integration tier (real Ray, MLflow, clusters) and the gpu tier (skipped,
# each with its reason, where no CUDA device is found). CI runs this.
test: lint
	$(VENV)/bin/pytest -q --durations=15 tests/unit tests/integration tests/gpu

# The unit tier alone: no Ray runtime, no processes; under a minute here.
test-fast: lint
	$(VENV)/bin/pytest -q tests/unit

# The gpu tier alone (tests/gpu/, marker gpu): bf16 and fp16 autocast, NCCL DDP, GPU decode, torch.compile on
# CUDA, a short `vitlab train` with data.decode=gpu, `vitlab bench train --device cuda --quick`. Needs CUDA.
test-gpu: lint
	$(VENV)/bin/pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) data runs mlruns mlflow.db
