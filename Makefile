# diffusionret_nb: `make demo` and `make test` each create .venv when missing, install, and run.
PYTHON ?= python3
export OMP_WAIT_POLICY ?= PASSIVE
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test gpu-wheels lab check-notebooks lint nbdev-test pytest clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-test.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

## the main job on the embedded synthetic world: render, train, evaluate, write results/demo/<run>/
demo: setup
	$(BIN)/diffret demo

## notebooks clean + exported in sync, no orphan module, lint, nbdev_test, then pytest
test: setup check-notebooks lint nbdev-test pytest

check-notebooks: setup
	$(BIN)/python tools/check_notebooks.py

lint: setup
	$(BIN)/ruff check --select F --exclude diffusionret_nb/_modidx.py diffusionret_nb tools tests

## each test command writes its temporary files (pytest's tmp_path folders, the notebooks' scratch folders, the
## runs they start) under a folder of its own, removed when it ends, passed or failed; KEEP_TMP=1 keeps it and says where.
## torch.compile's cache stays where torch keeps it by default, so that compiled kernels are reused between runs
SCRATCH = d=$$(mktemp -d "$${TMPDIR:-/tmp}/diffret-$@-XXXXXX") && \
	export TORCHINDUCTOR_CACHE_DIR="$${TORCHINDUCTOR_CACHE_DIR:-$${TMPDIR:-/tmp}/torchinductor_$$(id -un)}" && \
	if [ -n "$(KEEP_TMP)" ]; then echo "temporary files of $@: $$d (KEEP_TMP)"; else trap 'rm -rf "$$d"' EXIT; fi && TMPDIR=$$d

nbdev-test: setup
	@$(SCRATCH) OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing

## test files run on TEST_WORKERS processes (pytest-xdist, one file per worker at a time), each with one torch thread
TEST_WORKERS ?= 2
pytest: setup
	@$(SCRATCH) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile -o tmp_path_retention_policy=failed

## the packages tools/gpu_check.sh needs that the lent GPU machine lacks, as wheels in .whl/ (README, "The GPU check")
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 decord==0.6.0 av==18.1.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64
gpu-wheels: setup
	$(BIN)/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d .whl $(GPU_WHEELS)

lab: setup
	$(BIN)/jupyter lab nbs

clean-venv:
	rm -rf $(VENV)
