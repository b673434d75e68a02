# algodock: developer and CI entry points.  `make` (or `make help`) lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PY ?= python3
VENV = .venv
BASE_IMAGE ?= python:3.11-slim
BUILD = .build
# The legacy builder works with any client/engine pair here (a newer CLI without the
# buildx plugin cannot use BuildKit); set DOCKER_BUILDKIT=1 to use BuildKit instead.
DOCKER_BUILDKIT ?= 0
PYTEST_ARGS ?=

VENV_STAMP = $(VENV)/.algodock-installed
EXAMPLE_IMAGES = device-visits dwell-stats
EXAMPLE_VERSION = 1.0.0

.PHONY: help venv lint-imports fuzz engine base-image wheels images schemas browser postgres registry test demo bench clean cluster cluster-down

help: ## list the targets
	@echo "make targets:"
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo "variables: PY=$(PY) BASE_IMAGE=$(BASE_IMAGE) PYTEST_ARGS='$(PYTEST_ARGS)'"

venv: $(VENV_STAMP) ## create .venv and install the project with test extras

$(VENV_STAMP): pyproject.toml
	@if [ ! -x $(VENV)/bin/python ]; then echo "creating $(VENV) with $(PY)"; $(PY) -m venv $(VENV); fi
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

engine: ## make sure a Docker engine answers (installs/starts dockerd)
	bash scripts/ensure-docker.sh

# Always re-checked (cheap when the image exists), so a removed image is rebuilt; the
# resolved name is written to $(BUILD)/base-image only when it changes.
base-image: engine ## make sure the base image exists (pull, else offline build); name in .build/base-image
	@mkdir -p $(BUILD)
	@name=$$(bash scripts/ensure-base-image.sh '$(BASE_IMAGE)' | tail -n1); \
	  if [ -z "$$name" ]; then echo "base-image: no image name resolved" >&2; exit 1; fi; \
	  if [ ! -f $(BUILD)/base-image ] || [ "$$(cat $(BUILD)/base-image)" != "$$name" ]; then \
	    echo "$$name" > $(BUILD)/base-image; fi; \
	  echo "base image: $$name"

wheels: venv ## install the examples' Python deps (pyarrow) on the host into examples/*/.wheels
	bash scripts/build-wheels.sh

images: base-image wheels ## build algodock/device-visits:1.0.0 and algodock/dwell-stats:1.0.0
	@for algo in $(EXAMPLE_IMAGES); do \
	  echo "building algodock/$$algo:$(EXAMPLE_VERSION) FROM $$(cat $(BUILD)/base-image)"; \
	  DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) docker build -q \
	    --build-arg BASE_IMAGE="$$(cat $(BUILD)/base-image)" \
	    -t algodock/$$algo:$(EXAMPLE_VERSION) examples/$$algo; \
	done

schemas: venv ## regenerate the JSON schemas (python -m algodock.schemas)
	$(VENV)/bin/python -m algodock.schemas

browser: ## make sure Debian's chromium is installed (the UI tests drive it with Playwright; no browser download)
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null || echo present)"; \
	else echo "installing Debian's chromium"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends chromium; fi

postgres: ## make sure Debian's postgresql is installed (the team-server tests start a throwaway cluster on 127.0.0.1)
	@bin=$$(bash scripts/ensure-postgres.sh | tail -n1); echo "postgres: $$bin"

registry: ## make sure Debian's docker-registry and apache2-utils (htpasswd) are installed (the registry tests start one on 127.0.0.1)
	@if [ -x /usr/bin/docker-registry ] && [ -x /usr/bin/htpasswd ]; then echo "registry: $$(/usr/bin/docker-registry --version)"; \
	else echo "installing Debian's docker-registry and apache2-utils"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends docker-registry apache2-utils; fi

lint-imports: venv ## check the import layers (import-linter contracts in pyproject.toml)
	$(VENV)/bin/lint-imports

test: venv lint-imports engine base-image images browser postgres registry ## run the test suite (PYTEST_ARGS=... to pass options; PYTEST_ARGS="-m 'not browser'" skips the UI tests)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

fuzz: venv ## the property tests of tests/test_fuzz.py with the long profile (thousands of examples each)
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py $(PYTEST_ARGS)

demo: venv engine base-image images ## generate sample pings and run the demo pipeline
	$(VENV)/bin/python examples/generate_pings.py --out .algodock/demo/pings --devices 50 --hours 24 --parts 4 --seed 7
	bash scripts/demo.sh

bench: venv engine base-image images registry ## run every bench/*.py (helpers named _*.py are skipped); fails if any missed its target
	@shopt -s nullglob; files=(bench/[!_]*.py); failed=(); \
	  if [ $${#files[@]} -eq 0 ]; then echo "no bench/*.py"; exit 0; fi; \
	  for f in "$${files[@]}"; do echo "== $$f"; $(VENV)/bin/python "$$f" || failed+=("$$f"); done; \
	  if [ $${#failed[@]} -gt 0 ]; then echo "bench: failed or missed its target: $${failed[*]}" >&2; exit 1; fi; \
	  echo "bench: every target met"

clean: ## remove .build, .algodock, example wheels and leftover algodock containers (keeps .venv)
	rm -rf $(BUILD) .algodock $(addprefix examples/,$(addsuffix /.wheels,$(EXAMPLE_IMAGES)))
	rm -f $(VENV_STAMP)
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  docker ps -aq --filter label=io.algodock.managed=true | xargs -r docker rm -f; fi

cluster: venv engine base-image images ## rehearse several hosts on one machine: 2nd engine, Dask, workers, S3, Postgres, Prefect
	bash scripts/cluster-up.sh

cluster-down: ## tear down what `make cluster` started (the main engine stays)
	bash scripts/cluster-down.sh
