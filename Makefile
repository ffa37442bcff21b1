# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Each creates/refreshes .venv itself; every pip call goes through constraints.txt so the
# CPU wheel of torch is kept and nothing pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.uniseg-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-container bench bench-small bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,nnunet,dicom,sat]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/uniseg examples/example_ct.nii.gz -o out/demo --model uniseg-demo \
		--tasks liver,spleen,kidney,pancreas --preview

# The default suite (the one-node Slurm tests included; they skip without root), then the
# container recipe in a Debian chroot (skips without root): what CI runs.
test: venv
	$(PY) -m pytest -m "not slow and not gpu and not network" $(PYTEST_ARGS)
	$(MAKE) test-container

# The container recipe without a container runtime (root; `make test` runs it last): a
# Debian root file system (debootstrap, cached in /var/cache/uniseg-rootfs), the image's install
# script in it, then uniseg and the demo as the image's user. See README "Run in a container".
test-container: venv
	$(PY) -m pytest -s -m slow tests/test_container.py

# Every benchmark in its default size (about 75 min on 2 CPU cores, many_classes.py alone ~25);
# BENCH_ARGS="--device cuda" on a GPU, where gpu.py runs too (it is skipped without CUDA).
# Each prints its table, its headline last, and writes benchmarks/results/*.json (RESULTS.md).
BENCH_ARGS ?=
BENCH := OMP_WAIT_POLICY=PASSIVE $(PY)
bench: venv
	$(BENCH) benchmarks/startup.py
	$(BENCH) benchmarks/engine_vs_nnunet.py $(BENCH_ARGS)
	$(BENCH) benchmarks/end_to_end.py $(BENCH_ARGS)
	$(BENCH) benchmarks/multitask_scaling.py $(BENCH_ARGS)
	$(BENCH) benchmarks/memory.py $(BENCH_ARGS)
	$(BENCH) benchmarks/many_classes.py
	$(BENCH) benchmarks/workers.py
	$(BENCH) benchmarks/cohort.py
	$(BENCH) benchmarks/several_models.py
	if $(BENCH) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; \
	then $(BENCH) benchmarks/gpu.py --device cuda; else echo "gpu.py: skipped (no CUDA device)"; fi

# The same comparisons at toy sizes (each under 3 minutes on 2 CPU cores); the last line of
# each is its headline.
bench-small: venv
	$(BENCH) benchmarks/startup.py --small
	$(BENCH) benchmarks/engine_vs_nnunet.py --small $(BENCH_ARGS)
	$(BENCH) benchmarks/end_to_end.py --small $(BENCH_ARGS)
	$(BENCH) benchmarks/multitask_scaling.py --small $(BENCH_ARGS)
	$(BENCH) benchmarks/memory.py --small $(BENCH_ARGS)
	$(BENCH) benchmarks/workers.py --small
	$(BENCH) benchmarks/many_classes.py --small
	$(BENCH) benchmarks/cohort.py --small
	$(BENCH) benchmarks/several_models.py --small

# One CUDA GPU, under 8 minutes: engine vs nnU-Net, batch sizes, accumulators, 7 CT tasks on a
# 512x512x300 CT (benchmarks/gpu.py; results/gpu_cuda.json). Needs a CUDA build of torch.
bench-gpu: venv
	$(BENCH) benchmarks/gpu.py --device cuda $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
