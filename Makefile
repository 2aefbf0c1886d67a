# hvdbert: `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
NP ?= 2

.PHONY: setup demo test lint image image-test

setup:
	VENV="$(abspath $(VENV))" bash tools/setup.sh

# A real small pretraining: the tiny recipe on the embedded corpus, 2 Horovod workers over Gloo,
# evaluated at the end on the corpus's held-out documents (loss and perplexity in the last line).
# STEPS steps, the recipe's schedule stretched over them: 2500 give a model that the fine-tuning
# probe shows ahead of the same shape from scratch (from 2000 on; 300, the recipe's own count and a
# one-minute run, leave an encoder no better than a random one: docs/quality.md).
STEPS ?= 2500
demo: setup
	$(HOROVODRUN) --gloo -np $(NP) -H localhost:$(NP) $(PYTHON) -m hvdbert.pretrain \
		--recipe recipes/tiny.toml --output runs/demo-$$(date +%Y%m%d-%H%M%S) --set eval.at_end=true \
		--set train.max_steps=$(STEPS)

# shellcheck and hadolint (from PyPI wheels, cached outside the repo) for the launcher/Dockerfile tests.
lint:
	bash tools/lint.sh

# The suite in TEST_WORKERS pytest processes (pytest-xdist), a test file to each in turn, so that one
# file's module fixtures are built once, the longest files first (tests/conftest.py, LONGEST_FIRST);
# many tests wait on processes and timeouts, not on a core.
TEST_WORKERS ?= 2
test: setup
	bash tools/lint.sh --install
	$(PYTHON) -m pytest tests -m "not image" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# The container image (tools/build-image.sh: docker, podman or buildah; VARIANT=cpu or cuda), and
# the tests that run it: check-build, plan, a pretrain, two containers over SSH, a kill and a resume.
VARIANT ?= cpu
IMAGE ?= hvdbert:$(VARIANT)
image:
	VARIANT=$(VARIANT) IMAGE=$(IMAGE) bash tools/build-image.sh

image-test: setup image
	HVDBERT_IMAGE=$(IMAGE) $(PYTHON) -m pytest tests/test_image.py -m image
